"""The evaluation's batching options: built from `config.eval` in one place."""

import pathlib
import re

import pytest

from mlseg_jax.configs import quickstart
from mlseg_jax.evaluation import batching

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_from_config_reads_the_eval_fields_and_predict_takes_one_image_per_batch():
  config = quickstart.get_config()
  config.eval.images_per_batch, config.eval.windows_per_call = 3, 16
  config.eval.min_windows_per_call = 4
  b = batching.Batching.from_config(config.eval)
  assert (b.images_per_batch, b.windows_per_call, b.min_windows_per_call) == (3, 16, 4)
  p = batching.Batching.for_predict(config.eval)
  assert (p.images_per_batch, p.windows_per_call, p.min_windows_per_call) == (1, 16, 4)
  assert batching.ONE_IMAGE.images_per_batch == 1


def test_plan_rounds_up_to_the_process_devices():
  b = batching.Batching(images_per_batch=3, windows_per_call=10, min_windows_per_call=3)
  assert b.plan(1) == (3, 10, 3)
  assert b.plan(4) == (4, 12, 4)
  assert batching.Batching(windows_per_call=2, min_windows_per_call=2).plan(8) == (8, 8, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images_per_batch=0), "images_per_batch=0 must be a positive integer"),
    (dict(windows_per_call=2.5), "windows_per_call=2.5 must be a positive integer"),
    (dict(windows_per_call=4, min_windows_per_call=8),
     "min_windows_per_call=8 is more than windows_per_call=4"),
])
def test_bad_options_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    batching.Batching(**kwargs)


def test_only_batching_reads_the_options_from_a_config():
  # The eval config's defaults and its checks (evaluators.py) name them; everything else
  # takes a `Batching` (a name in a string, such as errors.py's removed fields, is no read).
  allowed = {"evaluation/batching.py", "evaluation/evaluators.py"}
  readers = sorted(
      str(path.relative_to(REPO / "mlseg_jax"))
      for path in (REPO / "mlseg_jax").rglob("*.py")
      if re.search(r"(?<![\w\"'])\w+\.(images_per_batch|windows_per_call|min_windows_per_call)\b",
                   path.read_text())
      and str(path.relative_to(REPO / "mlseg_jax")) not in allowed)
  assert readers == []
