"""One config per row of the paper's table, plus the quickstart (`configs/` in a checkout
links here). Each is a file with `get_config(arg)`, read by `--config FILE[:ARG]`."""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = ("__init__", "common", "validate")


def names() -> list[str]:
  """The configs this package holds, by name (`quickstart`, `segmenter_vit_b16_...`)."""
  return sorted(f[:-3] for f in os.listdir(DIR)
                if f.endswith(".py") and f[:-3] not in _NOT_CONFIGS)


def resolve(value: str) -> str:
  """A --config value as the path of its file, keeping any `:ARG`. A file that exists is
  itself; otherwise `NAME`, `NAME.py` or `configs/NAME.py` name this package's config, so
  the README's commands work from any directory once the package is installed."""
  path, colon, arg = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  if path in (name, f"{name}.py", f"configs/{name}.py") and name in names():
    return os.path.join(DIR, f"{name}.py") + colon + arg
  return value


def resolve_config_flags(argv: list[str]) -> list[str]:
  """argv with each `--config` value resolved (its overrides, `--config.x=...`, untouched)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out
