"""The one error type of bad user input: a config value, a flag, a data folder, a workdir.

The command-line tools print a ``UserError`` as one line and exit; every other exception is
a bug and keeps its traceback. It is a ``ValueError``, so library callers that catch
``ValueError`` keep working.
"""


class UserError(ValueError):
    """Input the user can fix: the message says what was wrong and what to do."""
