"""Paths: every file the project reads or writes goes through etils.epath, so `gs://...`
works wherever a local directory does."""

from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
  """A URL (`gs://bucket/run`), not a local path."""
  return "://" in os.fspath(path)


def absolute_path(path) -> epath.Path:
  """`path` as an absolute epath.Path (Orbax refuses relative paths); a URL such as
  `gs://bucket/run` is absolute already and is never turned into a local path."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))
