"""A trained model as a Python object: `Segmenter.from_workdir(DIR).predict(image)`.

    import mlseg_jax

    model = mlseg_jax.Segmenter.from_workdir("workdir/quickstart")
    out = model.predict("street.jpg")            # or a PIL image, or (H, W, 3) uint8
    out.labels                                   # (H, W) int32 class ids, the image's size
    out.selected                                 # MLSeg: [(class id, name, score)], best first
    outs = model.predict(["a.jpg", "b.jpg"], multi_scale=True, probabilities=True)

Prediction is `--mode eval`'s and `--mode predict`'s own code (`evaluation.runner.segment` with the
evaluators' test passes and jitted forward), so the labels equal the masks `--mode predict`
writes. Several images are batched through the sliding window together; the forward is
compiled once per window shape and reused by every later call.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
from typing import Any, Iterable, Iterator

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from mlseg_jax import errors
from mlseg_jax import sharding as sharding_lib
from mlseg_jax.configs import validate
from mlseg_jax.data import dataset_info
from mlseg_jax.data.datasets import image_to_rgb
from mlseg_jax.evaluation import batching as batching_lib
from mlseg_jax.evaluation import evaluators as evaluators_lib
from mlseg_jax.evaluation import runner
from mlseg_jax.evaluation.modes import load_params_for_eval
from mlseg_jax.models.decoders import decoder_spec

# Images segmented per `segment` call when predicting from an iterator: bounds the host
# memory a long stream holds at once.
CHUNK = 16


@dataclasses.dataclass
class Prediction:
  """What the model says about one image, at the image's own size."""
  labels: np.ndarray  # (H, W) int32 class ids.
  class_names: tuple[str, ...]
  # (H, W, n_cls) float32 class probabilities (softmax of the averaged window logits; the
  # mean of the passes' probabilities with multi_scale), when asked for.
  probabilities: np.ndarray | None = None
  # MLSeg heads: the classes the image was segmented among (the union of its windows'
  # top-k) as (id, name, sigmoid of the image logit), best first.
  selected: list[tuple[int, str, float]] | None = None

  def present(self) -> list[str]:
    """Names of the classes some pixel was given, most pixels first."""
    counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
    return [self.class_names[i] for i in np.argsort(-counts, kind="stable") if counts[i]]


class Segmenter:
  """A model with its parameters, the dataset's conventions and the config's test settings."""

  def __init__(self, config: ml_collections.ConfigDict, params, *, source: str = "", mesh=None):
    if decoder_spec(config.model).needs_labels:
      raise errors.ConfigError("the +GT oracle (model.decoder='mlseg_gt') needs each image's "
                               "labels: it cannot predict unlabelled images")
    self.config, self.params, self.source = config, params, source
    self.mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    self.dataset = dataset_info(config.data)
    spec = decoder_spec(config.model)
    self.topk = config.model.topk if spec.selects_topk else None
    self._forward = evaluators_lib.make_predict_fn(config.model)

  @classmethod
  def from_workdir(cls, workdir, config: ml_collections.ConfigDict | None = None, *,
                   mesh=None) -> "Segmenter":
    """The latest checkpoint of a training run; `config` defaults to the run's own
    (WORKDIR/config.json) and, if given, must match it where the parameters depend on it."""
    saved = validate.workdir_config(workdir)
    if config is None:
      if saved is None:
        raise errors.ConfigError(f"{workdir} holds no {validate.CONFIG_FILE}: pass config=")
      config = saved
    validate.validate_config(config, num_devices=_devices(mesh))
    if saved is not None and config is not saved:
      validate.check_against_workdir(config, saved, f"{workdir}/{validate.CONFIG_FILE}")
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    params, source = load_params_for_eval(config, os.fspath(workdir), mesh)
    return cls(config, params, source=source, mesh=mesh)

  @classmethod
  def from_pretrained(cls, directory, config: ml_collections.ConfigDict, *,
                      mesh=None) -> "Segmenter":
    """Weights converted by `python -m mlseg_jax.convert` (every parameter must be there)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = os.fspath(directory)
    validate.validate_config(config, num_devices=_devices(mesh))
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    params, source = load_params_for_eval(config, None, mesh)
    return cls(config, params, source=source, mesh=mesh)

  def predict(self, images, *, multi_scale: bool = False, probabilities: bool = False):
    """Segments one image (a path, a PIL image or an (H, W, 3) uint8 array) -> Prediction,
    or a list of them -> list, or any other iterable -> an iterator of Predictions.

    multi_scale: the config's `eval.scales` ratios, each also flipped with `eval.flip`,
      probabilities averaged (the paper's multi-scale numbers); else one pass at the test
      scale.
    """
    if _is_one_image(images):
      return next(iter(self._predict_all([images], multi_scale, probabilities)))
    if isinstance(images, (list, tuple)):
      return list(self._predict_all(images, multi_scale, probabilities))
    return self._predict_all(images, multi_scale, probabilities)

  def _predict_all(self, images: Iterable[Any], multi_scale: bool,
                   probabilities: bool) -> Iterator[Prediction]:
    evaluator = evaluators_lib.EVALUATORS["ms_flip" if multi_scale else "ss"]
    settings = evaluator.eval_settings(self.config, self.dataset)
    logits_fn = functools.partial(self._forward, self.params)
    batching = batching_lib.Batching.from_config(self.config.eval)
    images = iter(images)
    while chunk := list(itertools.islice(images, CHUNK)):
      records = [{"image": _as_rgb(image, i), "name": str(i)} for i, image in enumerate(chunk)]
      results = {}
      for batch in runner.segment(
          logits_fn, records, settings, num_classes=self.config.model.num_classes,
          topk=self.topk, mesh=self.mesh, data_axis=sharding_lib.BATCH_AXES,
          batching=batching, with_labels=False, keep_predictions=True,
          keep_scores=probabilities):
        for r in batch.images:
          results[r.index] = self._prediction(r, len(settings.passes), probabilities)
      yield from (results[i] for i in range(len(records)))

  def _prediction(self, r: runner.ImageResult, n_passes: int,
                  probabilities: bool) -> Prediction:
    names = tuple(self.dataset.class_names)
    out = Prediction(labels=r.prediction.astype(np.int32), class_names=names)
    if probabilities:
      scores = r.scores.astype(np.float32)
      if n_passes == 1:  # Averaged logits: softmax them.
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out.probabilities = scores / scores.sum(-1, keepdims=True)
      else:  # Summed probabilities of the passes.
        out.probabilities = scores / n_passes
    if r.image_scores is not None:
      ids = np.flatnonzero(r.selected)
      ids = ids[np.argsort(-r.image_scores[ids], kind="stable")]
      out.selected = [(int(i), names[i], float(1 / (1 + np.exp(-r.image_scores[i]))))
                      for i in ids]
    return out


def _devices(mesh) -> int | None:
  return None if mesh is None else mesh.size


def _is_one_image(x) -> bool:
  return isinstance(x, (str, os.PathLike, Image.Image, np.ndarray))


def _as_rgb(image, index: int) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a path, a PIL image or an array."""
  if isinstance(image, (str, os.PathLike)):
    path = epath.Path(image)
    if not path.is_file():
      raise FileNotFoundError(f"no image file {path}")
    try:
      with Image.open(io.BytesIO(path.read_bytes())) as im:
        return image_to_rgb(im, str(path))
    except errors.DataError:
      raise
    except (OSError, ValueError) as e:
      raise errors.DataError(f"{path}: cannot read the image ({e})") from None
  if isinstance(image, Image.Image):
    return image_to_rgb(image, f"image {index}")
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise errors.DataError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got "
                           f"{array.dtype} {array.shape}")
  return array
