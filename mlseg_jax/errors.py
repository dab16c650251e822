"""User mistakes end in one line and exit code 2; programming errors keep their traceback.

A mistake in what the user gave (a config field, a path, a data file, a checkpoint) raises a
`UserError` whose message names the thing and what is expected. `run(main)` is every entry
point's `app.run`: it prints such an error as `error: MESSAGE` on stderr and exits 2, and
does the same for a command line that does not parse (an unknown flag or config field, a
value of the wrong type, a config file that does not load). `--traceback` (or
MLSEG_TRACEBACK=1) shows the traceback instead. `--help` lists the entry point's own flags
and exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags
from mlseg_jax import configs

EXIT_CODE = 2
TRACEBACK_ENV = "MLSEG_TRACEBACK"
# Config fields that were renamed or folded into another, by their successor: an old name
# is refused like any unknown field, the suggestion naming what replaced it.
REMOVED_FIELDS = {"model.downsample": "model.pool_grid", "eval.multi_scale": "eval.run",
                  "eval.windows_per_batch": "eval.windows_per_call"}



class UserError(Exception):
  """A mistake in the user's input; the message says which input and what is expected."""


class ConfigError(UserError, ValueError):
  """A config field has a value that cannot work."""


class DataError(UserError, ValueError):
  """A dataset file or folder is missing, unreadable or holds values out of range."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or converted-weights directory does not fit the config or is unreadable."""


class UsageError(UserError):
  """Flags that do not fit together (a missing --workdir, --to with --format, ...)."""


# Raised by file access on a path the user gave, they are the user's too.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class FilesystemError(UserError):
  """A write the filesystem refused: full, read-only, not a directory, not allowed.

  path: what could not be written; reason: the filesystem's words ("no space left on
  device"); `errno` is the OSError's."""

  def __init__(self, message: str, *, code: int, path=None, reason: str = ""):
    super().__init__(message)
    self.errno, self.path, self.reason = code, path, reason

  def __str__(self):
    return self.args[0]


# The refusals of a filesystem that are the user's to fix (free space, a writable folder),
# in the words of strerror.
FILESYSTEM_ERRNOS = {errno.ENOSPC: "no space left on device",
                     errno.EDQUOT: "disk quota exceeded",
                     errno.EROFS: "read-only file system",
                     errno.ENOTDIR: "not a directory",
                     errno.EACCES: "permission denied"}
# TensorStore (Orbax's writes) reports the OS error inside a ValueError's text.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_PATH = re.compile(
    r'(?:Failed writing|Error writing local file|local file): "([^"]+)"')


def filesystem_error(error: BaseException, *, what: str | None = None,
                     path=None) -> FilesystemError | None:
  """The one-line FilesystemError of `error` when it, or an error it came from, is a
  filesystem's refusal in FILESYSTEM_ERRNOS (an OSError, or TensorStore's text of one);
  else None.

  The line is "WHAT: REASON" with `what` given ("checkpoint step 4 could not be written
  to DIR/4"), else "PATH: REASON", PATH being the file the error names, else `path`."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, FilesystemError):
      return error
    code, where = None, None
    if isinstance(error, OSError) and error.errno in FILESYSTEM_ERRNOS:
      code, where = error.errno, error.filename
    else:
      match = _TENSORSTORE_ERRNO.search(str(error))
      if match and int(match.group(1)) in FILESYSTEM_ERRNOS:
        code = int(match.group(1))
        named = _TENSORSTORE_PATH.search(str(error))
        where = named.group(1) if named else None
    if code is not None:
      reason = FILESYSTEM_ERRNOS[code]
      where = where if where is not None else path
      subject = what or (os.fspath(where) if where is not None else None)
      message = f"{subject}: {reason}" if subject else reason
      return FilesystemError(message, code=code, path=where, reason=reason)
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def writing(path, what: str | None = None):
  """Within: a write the filesystem refuses raises `filesystem_error`'s one line, naming
  `path` where the error names no file (a write that fails for want of space does not)."""
  try:
    yield
  except FilesystemError:
    raise
  except Exception as e:
    translated = filesystem_error(e, what=what, path=path)
    if translated is None:
      raise
    raise translated from e


def _wants_traceback(argv) -> bool:
  return (os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
          or any(a in ("--traceback", "-traceback", "--traceback=true") for a in argv))


def fail(message: str, code: int = EXIT_CODE) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _key_error(error: BaseException | None) -> KeyError | None:
  """The KeyError that a failed config override raised, if that is what `error` came from
  (ml_collections chains AttributeError <- KeyError("did you mean") <- KeyError)."""
  first = None
  while error is not None:
    if isinstance(error, KeyError):
      if "Did you mean" in str(error):
        return error
      first = first or error
    error = error.__context__
  return first


def _unknown_field(key_error: KeyError, argv) -> str:
  """"X is not a config field; did you mean Y?" for an override or a config file's
  assignment to a field the (locked) config does not have."""
  text = str(key_error.args[0]) if key_error.args else ""
  first = text.partition("\n")[0]
  locked = re.match(r'Key "([^"]+)" does not exist', first)  # Set in a config file.
  key = locked.group(1) if locked else first.strip("'\"")
  given = next((a.lstrip("-").split("=", 1)[0] for a in argv[1:]
                if re.fullmatch(rf"--?\w+(\.\w+)*\.{re.escape(key)}(=.*)?", a)), None)
  if given is None:  # Not on the command line: name a removed field by its full name.
    given = next((old for old in REMOVED_FIELDS if old.rpartition(".")[2] == key), key)
  line = f"{given} is not a config field"
  for old, new in REMOVED_FIELDS.items():
    if given == old or given.endswith("." + old):
      return f"{line}; did you mean {given[:-len(old)]}{new}?"
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  if suggestion:
    parent = given.rpartition(".")[0]
    line += f"; did you mean {parent + '.' if parent else ''}{suggestion.group(1)}?"
  return line


def describe_flag_error(error: BaseException, argv) -> str:
  """One line for a command line that did not parse."""
  key_error = _key_error(error) if isinstance(error, (AttributeError, KeyError)) else None
  if key_error is not None:
    return _unknown_field(key_error, argv)
  text = str(error)
  if "Traceback (most recent call last)" in text:
    # A config file's get_config raised: its own last line says what is wrong.
    flag = re.match(r"flag (--?[^=\s]+=\S+?):", text)
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    last = re.sub(r"^\w+(Error|Exception): ", "", last)
    return f"{flag.group(1)}: {last}" if flag else last
  message = " ".join(text.split())
  override = re.match(r"Unknown command line flag '(config\.[^']+)'", message)
  if override and not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    return (f"--{override.group(1)} overrides a field of --config, and there is no --config: "
            "pass --config (eval and predict with a --workdir of a run take its config.json "
            "and its overrides without one)")
  if isinstance(error, (flags.Error, _ConfigFileError)):
    return message
  return f"{type(error).__name__}: {message}"


class _ConfigFileError(Exception):
  pass


def _raise_deferred_config_error(name: str) -> None:
  """ml_collections keeps a config file that failed to load as a placeholder that raises
  when first used: raise it now, while the command line is being read."""
  value = flags.FLAGS[name].value
  if type(value).__name__ != "_ErrorConfig":
    return
  try:
    value.get  # noqa: B018 -- any attribute raises the stored error.
  except Exception as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise _ConfigFileError(f"--{name}: {lines[-1] if lines else e}") from e


def _print_help(module: str) -> NoReturn:
  doc = (sys.modules[module].__doc__ or "").strip() if module in sys.modules else ""
  if doc:
    print(doc, end="\n\n")
  print(flags.FLAGS.module_help(module) or "(no flags)")
  print(flags.FLAGS.module_help(__name__))
  sys.exit(0)


def run(main: Callable, *, module: str | None = None, argv=None) -> NoReturn:
  """`app.run(main)` with one-line errors (exit 2) and `--help` for `module`'s flags (exit 0).

  module: the module whose flags `--help` lists (default: the one defining `main`).
  argv: the command line (default: sys.argv).
  """
  module = module or main.__module__
  if "traceback" not in flags.FLAGS:  # Defined here: importing this module defines nothing.
    flags.DEFINE_bool("traceback", False, "Show the traceback of a configuration or input "
                      f"error (or set {TRACEBACK_ENV}=1).")
  argv = sys.argv if argv is None else argv
  show = _wants_traceback(argv)

  def parse(args):
    if any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in args[1:]):
      _print_help(module)
    args = configs.resolve_config_flags(args)
    try:
      rest = flags.FLAGS(args)
      for name in flags.FLAGS:
        _raise_deferred_config_error(name)
      return rest
    except Exception as e:  # Whatever the parse raises, its cause is the command line.
      if show:
        raise
      fail(describe_flag_error(e, args))

  try:
    app.run(main, argv=argv, flags_parser=parse)
  except Exception as e:
    translated = filesystem_error(e)  # A full or read-only disk, wherever it was met.
    if show or not (translated or isinstance(e, (UserError, *PATH_ERRORS))):
      raise
    fail(str(translated or e))
  raise AssertionError("app.run returned")  # It always exits.
