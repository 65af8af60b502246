"""The one exception type for bad user input.

Anything a user can get wrong (a recipe key, a data file, a model directory, a checkpoint) raises
`DistilError` with one line that says which file, which key, what was expected and what was found.
The CLI turns it into that line on stderr and exit code 2; `--debug` shows the traceback.
"""


class DistilError(Exception):
    """Bad input: the message is the whole user-facing explanation, on one line."""

    exit_code = 2


def crash_point(name: str) -> None:
    """Test hook for the crash-safety tests (tests/test_kill.py): with `DISTIL_TEST_KILL_AT=<name>` in the
    environment the process kills itself here with SIGKILL, as `kill -9` at that moment would. Unset, it costs one
    environment lookup; the names are listed where they are called (export: `export:*`, cache: `cache:*`)."""
    import os

    if os.environ.get("DISTIL_TEST_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
