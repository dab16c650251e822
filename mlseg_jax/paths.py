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
  system, a full disk, no permission). Checked with a file created and removed at once;
  a bucket's writes are checked where they happen (there is nothing cheap to ask)."""
  from mlseg_jax import errors

  path = absolute_path(path)
  if is_remote(path):
    return path
  what = f"{flag} {path}"
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
