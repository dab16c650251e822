"""The Python API: Segmenter.from_workdir(DIR).predict(...) gives what --mode predict draws."""

import numpy as np
import pytest
from PIL import Image

import mlseg_jax
from mlseg_jax import errors, train
from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax.evaluation import modes
from mlseg_jax.evaluation.predict import colorize
from test_train import random_batches, tiny_train_config

IMAGES = sorted((QUICKSTART_DATA / "images" / "val").iterdir())[:3]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("api")
  config = tiny_train_config("mlseg", total_steps=4, checkpoint_every=4)
  config.eval.windows_per_call = 4
  config.eval.stride = (64, 64)
  train.train(config, path, data_iter=random_batches())
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  return path, config


def test_predictions_equal_what_predict_mode_draws(workdir, tmp_path):
  path, config = workdir
  written = modes.predict(config, str(path), [str(p) for p in IMAGES],
                                      str(tmp_path / "pictures"))
  model = mlseg_jax.Segmenter.from_workdir(path)
  outs = model.predict(IMAGES)
  palette = np.asarray(model.dataset.palette, np.uint8)
  for out, w in zip(outs, written):
    mask = np.asarray(Image.open(w["mask"]))
    np.testing.assert_array_equal(colorize(out.labels, palette), mask)
    assert out.labels.shape == mask.shape[:2]
    assert out.selected and len(out.selected) >= config.model.topk
    scores = [s for _, _, s in out.selected]
    assert scores == sorted(scores, reverse=True)
  # One image as a path, a PIL image or an array: the same labels as in the batch.
  first = np.asarray(Image.open(IMAGES[0]).convert("RGB"))
  for image in (IMAGES[0], Image.open(IMAGES[0]), first):
    np.testing.assert_array_equal(model.predict(image).labels, outs[0].labels)


def test_probabilities_and_multi_scale(workdir):
  model = mlseg_jax.Segmenter.from_workdir(workdir[0])
  for multi_scale in (False, True):
    out = model.predict(IMAGES[0], multi_scale=multi_scale, probabilities=True)
    assert out.probabilities.shape == out.labels.shape + (11,)
    np.testing.assert_allclose(out.probabilities.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(out.probabilities.argmax(-1), out.labels)
  stream = model.predict(iter(IMAGES[:2]))
  assert not isinstance(stream, list)
  assert [p.labels.shape for p in stream] == [Image.open(p).size[::-1] for p in IMAGES[:2]]


def test_mistakes_are_named(workdir, tmp_path):
  model = mlseg_jax.Segmenter.from_workdir(workdir[0])
  with pytest.raises(errors.DataError, match=r"expected an \(H, W, 3\) uint8 RGB array"):
    model.predict(np.zeros((4, 4), np.float32))
  with pytest.raises(FileNotFoundError, match="no image file"):
    model.predict(tmp_path / "missing.jpg")
  with pytest.raises(errors.ConfigError, match="holds no config.json"):
    mlseg_jax.Segmenter.from_workdir(tmp_path)
