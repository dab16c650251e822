"""The persistent compilation cache: a second run compiles nothing the first compiled."""

import re

from conftest import QUICKSTART_TRAINING, run_main

_SUMMARY = re.compile(r"compilation: (\d+) programs compiled, (\d+) loaded from the "
                      r"persistent cache")


def _compiles(stderr: str) -> tuple[int, int]:
  found = _SUMMARY.findall(stderr)
  assert found, stderr[-3000:]
  return tuple(int(v) for v in found[-1])


def test_second_run_and_eval_compile_nothing_the_first_compiled(trained_quickstart, tmp_path):
  # The first run: conftest.trained_quickstart's training, into a cache it started empty.
  cache = trained_quickstart.cache
  compiled, loaded = _compiles(trained_quickstart.stderr)
  assert compiled >= 5 and loaded == 0  # the step, init, the evaluation's programs
  assert len(list(cache.iterdir())) >= compiled

  # A new run of the same config (a restart elsewhere) and an evaluation of the first.
  again = run_main(*QUICKSTART_TRAINING, f"--config.compilation_cache={cache}",
                   "--workdir", tmp_path / "b")
  assert _compiles(again.stderr) == (0, compiled)
  first = trained_quickstart.copy_to(tmp_path / "a")
  evaluation = run_main("--mode", "eval", "--workdir", first)
  compiled_eval, loaded_eval = _compiles(evaluation.stderr)
  assert compiled_eval == 0 and loaded_eval > 0
