import sys

from distil.cli import main

sys.exit(main())
