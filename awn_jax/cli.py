"""What the thin command-line entry points share: flag parsing and error reporting that
turn bad input into one clear line instead of a traceback."""

from __future__ import annotations

import sys

from absl import app, flags

from awn_jax.training.checkpointing import CheckpointError

# Errors that describe bad input or a stopped run; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, OSError, CheckpointError, FloatingPointError)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}\nPass --help for the flags.")
    except (AttributeError, KeyError) as error:  # ml_collections: an unknown config key
        key = str(error).strip("\"'")
        sys.exit(f"error: unknown config key {key}; the keys are those of the config file "
                 "(see configs/default.py)")
    except (TypeError, ValueError) as error:     # ml_collections: a value of the wrong type
        sys.exit(f"error: bad config override: {error}")


def run(main) -> None:
    """``app.run(main)`` with one-line errors for bad flags, configs and inputs."""
    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as error:
            sys.exit(f"error: {error}")

    app.run(guarded, flags_parser=_parse_flags)
