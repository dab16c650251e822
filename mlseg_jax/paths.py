"""Paths: every file the project reads or writes goes through etils.epath, so `gs://...`
works wherever a local directory does."""

from __future__ import annotations

import os
import socket

from etils import epath


def is_remote(path) -> bool:
  """A URL (`gs://bucket/run`), not a local path."""
  return "://" in os.fspath(path)


def absolute_path(path) -> epath.Path:
  """`path` as an absolute epath.Path (Orbax refuses relative paths); a URL such as
  `gs://bucket/run` is absolute already and is never turned into a local path."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def writable_directory(path, flag: str = "--workdir") -> epath.Path:
  """`path` as an absolute directory, created if need be, where a file can be written;
  else `errors.UserError` in one line naming `flag` and `path` (a file, a read-only file
  system, a full disk, no permission; a bucket that does not exist or refuses this
  machine's writes). Checked with a file (in a bucket, an object) created and removed at
  once: before the compile, not at the first checkpoint."""
  from mlseg_jax import errors

  path = absolute_path(path)
  what = f"{flag} {path}"
  if is_remote(path):
    _check_bucket_writes(path, what)
    return path
  for folder in (path, *path.parents):
    if folder.exists():
      if not folder.is_dir():
        inside = "" if folder == path else f": {folder} is a file"
        raise errors.UsageError(f"{what} is not a directory{inside}" if inside
                                else f"{what} is a file, not a directory")
      break
  probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"
  with errors.writing(path, what=what):
    path.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  return path


def _check_bucket_writes(path: epath.Path, what: str) -> None:
  """An object written under `path` and deleted, or `errors.UserError` saying why not (the
  storage client's own errors name an upload URL and nothing else)."""
  from mlseg_jax import errors

  probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except FileNotFoundError:  # A 404 on an upload: the bucket is not there.
    bucket = os.fspath(path).split("://", 1)[1].split("/", 1)[0]
    raise errors.UserError(f"{what}: the bucket {bucket} does not exist (or these "
                           "credentials cannot see it)") from None
  except OSError as e:
    lines = str(e).splitlines()
    if lines and lines[0].startswith("Forbidden"):  # gcsfs's 403: URL, then the reason.
      reason = " ".join(lines[1:]).strip() or "permission denied"
      raise errors.UserError(f"{what} is not writable with these credentials: "
                             f"{reason}") from None
    translated = errors.filesystem_error(e, what=what)
    if translated is None:
      raise
    raise translated from e
