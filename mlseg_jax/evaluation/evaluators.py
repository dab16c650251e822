"""Evaluators: what training's periodic evaluation and `--mode eval` run, listed by name in
`config.eval.run`.

  ss       the single-scale sliding window at the test scale (the paper's single-scale mIoU);
  ms_flip  the same at every `eval.scales` ratio of the test scale, each also flipped when
           `eval.flip`, softmax averaged (the paper's multi-scale mIoU).

Each is built from a predict function and the config, `EVALUATORS[name](predict_fn, config,
records, dataset, mesh)`; `run(params)` yields (name, value) pairs, the entries of
`runner.evaluate`'s results (aAcc, mIoU, mAcc, IoU, Acc, labelled_pixels, [multilabel],
num_images, settings), so `dict(evaluator.run(params))` is the results file's content.

`make_predict_fn` jits the forward once and takes the parameters as an argument, so every
evaluation of a run (and every evaluator of one) reuses its compilation. For the +GT oracle
(model.decoder="mlseg_gt") the forward also takes, per window, the class set of its whole
image's labels: the same sliding window, batched like any other model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
from ml_collections import config_dict

from mlseg_jax import data as data_lib
from mlseg_jax import preemption
from mlseg_jax import sharding as sharding_lib
from mlseg_jax.evaluation import batching as batching_lib
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import runner
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import build_model
from mlseg_jax.models.vit import VARIANTS


def default_eval_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The evaluators (EVALUATORS) run, in this order, by the periodic evaluation and by
  # --mode eval; the first one's number picks the best checkpoint, and --mode predict
  # uses the first one's test passes.
  c.run = ("ss",)
  c.mode = "slide"
  c.stride = (512, 512)  # mmseg test_cfg stride; the window is data.crop_size.
  c.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # ms_flip: ratios of the test scale.
  c.flip = True  # ms_flip: each scale also flipped horizontally.
  c.windows_per_call = 8  # Windows per jitted model call (per process), at most.
  # The fewest: the windows left after the full calls go in calls of this times a power of
  # two. 1 computes no padding; windows_per_call compiles the forward once per window shape
  # (the last call padded), for many distinct shapes on an accelerator, where a compilation
  # costs more than the padding (multi-scale + flip with exact small windows).
  c.min_windows_per_call = 1
  # Images whose windows share one jitted call; device memory grows with it times the image
  # size times the class count (keep 1-2 for COCO+LVIS's 1284 classes).
  c.images_per_batch = 2
  # Resized images smaller than the window (every ADE20K image at ratios 0.5 and 0.75):
  # unset runs them exactly as mmseg does (the model on the window at its own size): with
  # heads that mask padding (mask transformer, linear, MLSeg) padded to the window with
  # the padding hidden, one compilation per call size; with the others cut at their size
  # rounded up to the patch, one compilation per distinct small size. A multiple of the
  # patch cuts them at that multiple; 0 pads them to the window unmasked, at the price of
  # the extra zero tokens the backbone attends to (docs/differences.md).
  c.small_window_multiple = config_dict.placeholder(int)
  c.split = "val"
  c.max_images = 0  # 0: the whole split.
  return c


def resolve_eval_config(config: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the eval fields, one line each, for `main.validate_config`."""
  e = config.eval
  problems = [f"eval.run: {name!r} is not an evaluator (one of {sorted(EVALUATORS)})"
              for name in e.run if name not in EVALUATORS]
  if not e.run:
    problems.append(f"eval.run is empty: name one or more of {sorted(EVALUATORS)}")
  for name in ("windows_per_call", "min_windows_per_call", "images_per_batch"):
    if e[name] < 1:
      problems.append(f"eval.{name}={e[name]} must be positive")
  if e.min_windows_per_call > e.windows_per_call:
    problems.append(f"eval.min_windows_per_call={e.min_windows_per_call} is more than "
                    f"eval.windows_per_call={e.windows_per_call}")
  if e.small_window_multiple is not None and e.small_window_multiple < 0:
    problems.append(f"eval.small_window_multiple={e.small_window_multiple}: 0 pads small "
                    "images to the window, a multiple of the patch cuts them at that multiple")
  return problems


def make_predict_fn(model_config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """The jitted forward: predict_fn(params, windows (N, h, w, 3)) -> {"logits", and for
  top-k heads "image_logits"}; for +GT predict_fn(params, windows, classes (N, n_cls) bool)
  -> {"logits"}. Heads that mask padding (`DecoderSpec.masks_padding`) also take
  `valid_grid=` (N, 2) int32, each padded window's own token grid. Traced once per window
  shape, whatever the parameters' values."""
  model = build_model(model_config)
  if decoder_spec(model_config).needs_labels:

    def forward(params, windows, classes):
      out = model.apply({"params": params}, windows, train=False, labels=classes)
      return {"logits": out["logits"]}
  else:

    def forward(params, windows, valid_grid=None):
      out = model.apply({"params": params}, windows, train=False, valid_grid=valid_grid)
      return {k: out[k] for k in ("logits", "image_logits") if k in out}

  return jax.jit(forward)


class FirstN(Sequence):
  """The first n records of a dataset (all of them for n = 0), still read lazily."""

  def __init__(self, records: Sequence[dict[str, Any]], n: int):
    self.records, self.n = records, min(n, len(records)) if n else len(records)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.records[i]


class Evaluator:
  """The sliding-window evaluation of `records` with the test passes of `passes`."""

  name: str

  def __init__(self, predict_fn: Callable[..., Any], config: ml_collections.ConfigDict,
               records: Sequence[dict[str, Any]], dataset, mesh):
    e, spec = config.eval, decoder_spec(config.model)
    self.predict_fn, self.records = predict_fn, records
    self.settings = self.eval_settings(config, dataset)
    self.options = dict(
        num_classes=config.model.num_classes, class_names=dataset.class_names,
        topk=config.model.topk if spec.selects_topk else None, mesh=mesh,
        data_axis=sharding_lib.BATCH_AXES, batching=batching_lib.Batching.from_config(e),
        gt_classes=spec.needs_labels)

  @staticmethod
  def passes(eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `ratios` and `flip` of `EvalSettings`."""
    raise NotImplementedError

  @classmethod
  def eval_settings(cls, config: ml_collections.ConfigDict,
                    dataset) -> geometry.EvalSettings:
    """How this evaluator tests an image; `dataset` gives the normalisation."""
    e = config.eval
    return geometry.EvalSettings(
        mean=dataset.mean, std=dataset.std, test_scale=tuple(config.data.test_scale),
        crop=tuple(config.data.crop_size), stride=tuple(e.stride),
        patch_size=VARIANTS[config.model.backbone][3],
        small_window_multiple=e.small_window_multiple,
        # Exact small windows at the crop's shape where the head masks their padding.
        masked_padding=(e.small_window_multiple is None
                        and decoder_spec(config.model).masks_padding),
        **cls.passes(e))

  def run(self, params) -> Iterator[tuple[str, Any]]:
    predict = stops_on_signal(functools.partial(self.predict_fn, params))
    results = runner.evaluate(predict, self.records, self.settings, **self.options)
    yield from results.items()


class SingleScale(Evaluator):
  """One pass at the test scale."""

  name = "ss"

  @staticmethod
  def passes(eval_config):
    return dict(ratios=(1.0,), flip=False)


class MultiScaleFlip(Evaluator):
  """A pass at each `eval.scales` ratio of the test scale, and each flipped with `eval.flip`."""

  name = "ms_flip"

  @staticmethod
  def passes(eval_config):
    return dict(ratios=tuple(eval_config.scales), flip=bool(eval_config.flip))


EVALUATORS: dict[str, type[Evaluator]] = {e.name: e for e in (SingleScale, MultiScaleFlip)}


def build_evaluators(config: ml_collections.ConfigDict, mesh) -> list[Evaluator]:
  """The evaluators of `config.eval.run` on the first `eval.max_images` of `eval.split`,
  sharing one jitted predict function: build them once per run."""
  problems = resolve_eval_config(config)
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
  dataset = data_lib.get_dataset(config.data, config.eval.split)
  records = FirstN(dataset, config.eval.max_images)
  predict_fn = make_predict_fn(config.model)
  return [EVALUATORS[name](predict_fn, config, records, dataset, mesh)
          for name in config.eval.run]


def stops_on_signal(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, checking before each call whether a signal asks the evaluation to end."""

  def call(*args, **kwargs):
    preemption.check_interrupted()
    return fn(*args, **kwargs)

  return call
