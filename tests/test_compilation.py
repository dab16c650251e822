"""The persistent compilation cache: a second run compiles nothing the first compiled."""

import re

from test_main import TINY, _main

_SUMMARY = re.compile(r"compilation: (\d+) programs compiled, (\d+) loaded from the "
                      r"persistent cache")


def _compiles(proc) -> tuple[int, int]:
  found = _SUMMARY.findall(proc.stderr)
  assert found, proc.stderr[-3000:]
  return tuple(int(v) for v in found[-1])


def test_second_run_and_eval_compile_nothing_the_first_compiled(tmp_path):
  cache = tmp_path / "cache"
  common = ["--config", "configs/quickstart.py", *TINY, "--config.train.total_steps=2",
            "--config.train.eval_every=2", f"--config.compilation_cache={cache}"]
  first = _main(*common, "--workdir", str(tmp_path / "a"))
  compiled, loaded = _compiles(first)
  assert compiled >= 5 and loaded == 0  # the step, init, the evaluation's programs
  assert len(list(cache.iterdir())) >= compiled

  # A new run of the same config (a restart elsewhere) and an evaluation of the first.
  again = _main(*common, "--workdir", str(tmp_path / "b"))
  assert _compiles(again) == (0, compiled)
  evaluation = _main("--mode", "eval", "--workdir", str(tmp_path / "a"))
  compiled_eval, loaded_eval = _compiles(evaluation)
  assert compiled_eval == 0 and loaded_eval > 0
