"""The one exception type for bad user input.

Anything a user can get wrong (a recipe key, a data file, a model directory, a checkpoint) raises
`DistilError` with one line that says which file, which key, what was expected and what was found.
The CLI turns it into that line on stderr and exit code 2; `--debug` shows the traceback.
"""


class DistilError(Exception):
    """Bad input: the message is the whole user-facing explanation, on one line."""

    exit_code = 2
