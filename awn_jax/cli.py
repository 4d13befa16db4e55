"""What the thin command-line entry points share: flag parsing and error reporting that
turn bad input into one clear line instead of a traceback, and a quiet console.

Only :class:`awn_jax.errors.UserError` (bad config values, data, checkpoints, flags) and
what absl and ml_collections raise while parsing flags become one line; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from awn_jax.bn_statistics import SOURCES, BNStats
from awn_jax.errors import UserError


def _unknown_key_message(error: BaseException) -> str:
    """ml_collections reports an unknown key as an AttributeError around a KeyError whose
    text is the quoted key, then a "Did you mean" line; ``str()`` of it shows escapes."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    quoted_key, *hints = str(error.args[0] if error.args else error).splitlines()
    key = quoted_key.strip("\"'")
    hint = " ".join(line.strip() for line in hints)
    hint = f" ({hint[:1].lower()}{hint[1:]})" if hint else ""
    return (f"error: unknown config key {key}{hint}; the keys are those of the config file "
            "(see configs/default.py)")


def _load_config_files(flag_values) -> None:
    """ml_collections keeps a config file's load error until the config is first used;
    raise it here, while the flags are parsed."""
    for name in flag_values:
        flag = flag_values[name]
        if config_flags.is_config_flag(flag) and flag.value is not None:
            try:
                getattr(flag.value, "keys", None)  # a file that failed to load raises here
            except OSError as error:
                reason = str(error).strip().splitlines()[-1].strip()
                sys.exit(f"error: cannot load --{name} "
                         f"{config_flags.get_config_filename(flag)}: {reason}")


def _underscored(argv, flag_values) -> list[str]:
    """``argv`` with the dashed spellings of earlier versions (``--data-dir``, ``--nobn-stats-
    augment``) as the flags are named now (absl's ``--data_dir``), one notice per flag."""
    result, renamed = [], []
    for position, arg in enumerate(argv):
        if arg == "--":
            return result + argv[position:]
        name, equals, value = arg.partition("=")
        bare = name[2:]
        for prefix in ("", "no"):
            dashed = bare[len(prefix):]
            if (name.startswith("--") and "-" in dashed and bare.startswith(prefix)
                    and dashed not in flag_values and dashed.replace("-", "_") in flag_values):
                new = "--" + prefix + dashed.replace("-", "_")
                if new not in renamed:
                    renamed.append(new)
                    print(f"note: {name} is now spelled {new}; the dashed spelling will go",
                          file=sys.stderr)
                arg = new + equals + value
                break
        result.append(arg)
    return result


def _parse_flags(argv, help_for=None):
    argv = _underscored(argv, flags.FLAGS)
    text = help_for(argv) if help_for else None
    if text is not None:   # a command's own help for what argv names (evaluate's studies)
        print(text)
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}\nPass --help for the flags.")
    except (AttributeError, KeyError) as error:  # ml_collections: an unknown config key
        sys.exit(_unknown_key_message(error))
    except (TypeError, ValueError) as error:     # ml_collections: a value of the wrong type
        sys.exit(f"error: bad config override: {error}")
    _load_config_files(flags.FLAGS)
    return remaining


def run(main, help_for=None) -> None:
    """``app.run(main)`` with one-line errors for bad flags, configs and inputs, and absl
    logging at WARNING unless ``--verbosity`` is given (Orbax logs every checkpoint save
    and restore at INFO). ``help_for(argv)``: a help text that replaces absl's --help for
    this command line, or None."""
    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as error:
            sys.exit(f"error: {error}")

    app.run(guarded, flags_parser=functools.partial(_parse_flags, help_for=help_for))


def define_bn_stats_flags():
    """Define ``--bn_stats``, ``--bn_stats_images`` and ``--bn_stats_augment``; returns
    ``batch_size -> BNStats`` of their values (``batch_size``: the evaluation batch, which
    "-R" statistics are estimated for)."""
    source = flags.DEFINE_enum(
        "bn_stats", "trained", list(SOURCES),
        "BatchNorm statistics: trained (the running averages of training), reestimate "
        "(population statistics of training images, layer by layer) or "
        "reestimate-running-mean (the same under the -R forward, at the evaluation batch); "
        "re-estimated ones are computed once and kept beside the run's "
        "(awn_jax.bn_statistics).")
    images = flags.DEFINE_integer("bn_stats_images", 10_000,
                                  "Training images for re-estimated BN statistics.",
                                  lower_bound=2)
    augment = flags.DEFINE_bool("bn_stats_augment", False,
                                "Re-estimate BN statistics on augmented training images "
                                "(crop + flip).")
    return lambda batch_size: BNStats(source.value, num_images=images.value,
                                      augment=augment.value, batch_size=batch_size)


# ------------------------------------------------------------------ settings dataclasses
# A command's settings as a frozen dataclass: each field one flag of default None (the
# dataclass's default applies when the flag is not given), its kind from the field's type,
# its help and lower bound from the field's metadata ({"help": ..., "lower_bound": ...}).

_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}


def _field_kind(hint) -> tuple[type, type | None]:
    """``(kind, item)``: ``int | None`` -> ``(int, None)``, ``tuple[float, ...]`` ->
    ``(tuple, float)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def settings_fields(settings_type, flag_names=None):
    """``(flag name, field, (kind, item))`` of each field of ``settings_type``."""
    hints = typing.get_type_hints(settings_type)
    names = flag_names or {}
    return [(names.get(f.name, f.name), f, _field_kind(hints[f.name]))
            for f in dataclasses.fields(settings_type)]


def define_settings_flags(settings_type, flag_names=None) -> None:
    """One flag per field of ``settings_type`` (fields shared with an earlier settings type
    share its flag)."""
    for name, field, (kind, _) in settings_fields(settings_type, flag_names):
        if name in flags.FLAGS:
            continue
        help_text = field.metadata.get("help", "")
        if kind is tuple:
            flags.DEFINE_list(name, None, help_text)
        elif kind is bool:
            flags.DEFINE_bool(name, None, help_text)
        else:
            bound = field.metadata.get("lower_bound")
            extra = {} if bound is None or kind is str else {"lower_bound": bound}
            _DEFINE[kind](name, None, help_text, **extra)


def settings_from_flags(settings_type, flag_names=None):
    """``settings_type`` with the values of the flags given, its defaults for the rest."""
    values = {}
    for name, field, (kind, item) in settings_fields(settings_type, flag_names):
        value = flags.FLAGS[name].value
        if value is not None and kind is tuple:
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                raise UserError(f"--{name} must be a comma-separated list of "
                                f"{item.__name__}s, got {','.join(value)}") from None
        if value is not None:
            values[field.name] = value
    return settings_type(**values)


def settings_help(settings_type, flag_names=None) -> list[str]:
    """One line per field: its flag, help and default."""
    lines = []
    for name, field, _ in settings_fields(settings_type, flag_names):
        default = field.default
        shown = (",".join(f"{v:.4g}" for v in default) if isinstance(default, tuple) else
                 f"{default:.4g}" if isinstance(default, float) else default)
        lines.append(f"  --{name}: {field.metadata.get('help', '')}"
                     + ("" if default is None else f" (default: {shown})"))
    return lines
