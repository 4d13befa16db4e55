"""The one error type of bad user input: a config value, a flag, a data folder, a workdir.

The command-line tools print a ``UserError`` as one line and exit; every other exception is
a bug and keeps its traceback. It is a ``ValueError``, so library callers that catch
``ValueError`` keep working; the subclasses below are also the built-in type a caller
would catch for their case.
"""


class UserError(ValueError):
    """Input the user can fix: the message says what was wrong and what to do."""


class MissingDataError(UserError, FileNotFoundError):
    """The data a config points to is not there (a folder, a TFDS dataset not prepared)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite: the run stopped, its last checkpoint kept
    (the remedy is in the config: a lower learning rate, another seed)."""
