"""From a config and a workdir to numbers and pictures: `--mode eval`, `--mode predict`,
and the periodic evaluation during training.

The evaluators of `config.eval.run` (evaluators.py) are built once per run, so every
evaluation reuses their compiled forward. Weights come from the parameters of the workdir's
latest training checkpoint (nothing else of it is read), else from `config.init_from` (a
directory written by `mlseg_jax.convert`, loaded strictly: every parameter must be there,
so a backbone-only AugReg conversion is refused here).
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from mlseg_jax import checkpoints
from mlseg_jax import data as data_lib
from mlseg_jax import distributed
from mlseg_jax import errors
from mlseg_jax import paths
from mlseg_jax import pretrained
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import tracking
from mlseg_jax.data import classes as classes_lib
from mlseg_jax.evaluation import batching as batching_lib
from mlseg_jax.evaluation import evaluators as evaluators_lib
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax.evaluation import pictures as pictures_lib
from mlseg_jax.evaluation import predict as predict_lib
from mlseg_jax.evaluation import runner
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import abstract_params


def evaluate_params(evaluators: Sequence[evaluators_lib.Evaluator], params, *,
                    workdir=None, step: int | None = None,
                    tracker: tracking.Tracker | None = None, sample_images: int = 0,
                    palette: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
  """Runs each evaluator on `params`, writes its JSON + table, confusion matrix (.npy) and
  pictures (the confusion heatmap and per-class IoU bars, `pictures.py`) to
  WORKDIR/eval/[step_N_]NAME and returns the scalars of all of them (NAME/mIoU, ...).

  With `sample_images` N > 0, the pictures and N validation images (ground truth beside
  the prediction, `sample_pictures`) also go to `tracker` as images at `step`, tagged
  eval/NAME/...; every process must pass the same N (the samples run on all of them).
  """
  scalars = {}
  main = distributed.is_main_process()
  for evaluator in evaluators:
    kind = evaluator.name
    distributed.align(f"evaluation {kind}")  # `--mode eval`'s processes start at their pace.
    results = dict(evaluator.run(params))
    name = f"step_{step}_{kind}" if step is not None else kind
    drawn = {}
    if main and (workdir is not None or sample_images):
      drawn = pictures_lib.pictures(results, palette=palette,
                                  title=kind if step is None else f"{kind}, step {step}")
    if workdir is not None and main:
      directory = epath.Path(workdir) / "eval"
      path = metrics_lib.write_results(results, directory, name)
      pictures_lib.write_pictures(drawn, directory, name)
      logging.info("evaluation written to %s (with %s)\n%s", path,
                   ", ".join(f"{name}_{k}.png" for k in drawn) or "no pictures",
                   metrics_lib.format_table(results))
    logging.info("%s mIoU=%.2f aAcc=%.2f mAcc=%.2f (%d images)", kind,
                 100 * results["mIoU"], 100 * results["aAcc"], 100 * results["mAcc"],
                 results["num_images"])
    scalars.update(metrics_lib.tensorboard_scalars(results, prefix=kind))
    if sample_images:
      samples = sample_pictures(evaluator, params, sample_images, palette)
      if tracker is not None:
        images = {f"eval/{kind}/{k}": v for k, v in drawn.items()}
        images.update({f"eval/{kind}/sample_{i}": v for i, v in enumerate(samples)})
        tracker.images(step or 0, images)
  return scalars


# Sample pictures are scaled to this height at most: readable, and small in event files.
SAMPLE_HEIGHT = 384


def sample_pictures(evaluator: evaluators_lib.Evaluator, params, n: int,
                    palette: Sequence[Sequence[int]] | None) -> list:
  """The first `n` images of the evaluator's split, ground truth beside its prediction (the
  evaluator's own test passes and compiled forward) with a legend, (H, W, 3) uint8 each.
  Every process runs it; each gets the pictures of its own share of the n images."""
  o = evaluator.options
  names = list(o["class_names"])
  palette = palette if palette is not None else classes_lib.voc_colormap(len(names))
  records = evaluators_lib.FirstN(evaluator.records, n)
  predict = evaluators_lib.stops_on_signal(functools.partial(evaluator.predict_fn, params))
  pictures = []
  for batch in runner.segment(
      predict, records, evaluator.settings, num_classes=o["num_classes"], topk=o["topk"],
      mesh=o["mesh"], data_axis=o["data_axis"], batching=o["batching"],
      gt_classes=o["gt_classes"], keep_predictions=True):
    for result in batch.images:
      record = records[result.index]
      image, label, prediction = _scaled(record["image"], record["label"], result.prediction)
      pictures.append(predict_lib.comparison_picture(image, label, prediction, palette, names))
  return pictures


def _scaled(image, label, prediction):
  """The three at most SAMPLE_HEIGHT high (the maps by nearest neighbour)."""
  h, w = image.shape[:2]
  if h <= SAMPLE_HEIGHT:
    return image, label, prediction
  size = (max(round(w * SAMPLE_HEIGHT / h), 1), SAMPLE_HEIGHT)
  image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
  label, prediction = (cv2.resize(np.asarray(m, np.int32), size,
                                  interpolation=cv2.INTER_NEAREST)
                       for m in (label, prediction))
  return image, label, prediction


def periodic_eval_fn(config, workdir, tracker: tracking.Tracker | None = None,
                     ) -> Callable[[Any, int], dict[str, float]]:
  """`fn(params, step) -> scalars` for the training loop; its evaluators are built here,
  once, so later evaluations do not trace or compile the forward again. `tracker`
  (training's) takes the pictures of `logging.tensorboard_images`."""
  mesh = sharding_lib.make_mesh(config.mesh)
  evaluators = evaluators_lib.build_evaluators(config, mesh)
  options = dict(workdir=workdir, tracker=tracker,
                 sample_images=config.logging.tensorboard_images if tracker else 0,
                 palette=data_lib.dataset_info(config.data).palette)
  return lambda params, step: evaluate_params(evaluators, params, step=step, **options)


def load_params_for_eval(config, workdir, mesh):
  """(params, where they came from): the latest checkpoint in workdir, else init_from."""
  abstract = abstract_params(config.model)
  shardings = sharding_lib.tree_shardings(mesh, abstract, config.mesh.rules,
                                          config.mesh.min_fsdp_size)
  if workdir and (epath.Path(workdir) / "checkpoints").exists():
    mngr = checkpoints.checkpoint_manager(workdir, config)
    params, step = checkpoints.restore_params(mngr, abstract, shardings)
    if params is not None:
      return params, f"{mngr.directory}/{step}"
  if config.init_from:
    target = checkpoints.with_shardings(abstract, shardings)
    return pretrained.load_params(config.init_from, target=target), config.init_from
  raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints and no "
                          "--config.init_from: nothing to evaluate")


def checkpoint_step(source: str) -> int:
  """The training step of a checkpoint `load_params_for_eval` read (0 for init_from)."""
  name = epath.Path(source).name
  return int(name) if name.isdigit() else 0


def evaluate_checkpoint(config, workdir) -> dict[str, float]:
  """`--mode eval`: the scalars go to stdout as JSON (the command's result), and with the
  pictures of `logging.tensorboard_images` to WORKDIR/tensorboard/eval (a run of its own
  beside training's) and W&B, at the checkpoint's step."""
  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = load_params_for_eval(config, workdir, mesh)
  evaluators = evaluators_lib.build_evaluators(config, mesh)
  logging.info("evaluating %s", source)
  step = checkpoint_step(source)
  tracker = tracking.open_tracker(config, workdir, job_type="eval",
                                  tensorboard_dir=epath.Path(workdir) / "tensorboard" / "eval")
  try:
    scalars = evaluate_params(evaluators, params, workdir=workdir, tracker=tracker,
                              sample_images=config.logging.tensorboard_images,
                              palette=data_lib.dataset_info(config.data).palette)
    tracker.scalars(step, scalars, prefix="eval")
  finally:
    tracker.close()
  if distributed.is_main_process():
    print(json.dumps(scalars, indent=2))
  return scalars


def predict(config, workdir, images, output):
  """`--mode predict`: pictures of `images` with the test passes of the first evaluator of
  `eval.run`."""
  if decoder_spec(config.model).needs_labels:
    raise errors.ConfigError(
        "the +GT oracle (model.decoder='mlseg_gt') takes each image's class set from its "
        "labels: predict on unlabelled images is not possible; use --mode eval")
  problems = evaluators_lib.resolve_eval_config(config)
  if problems:
    raise errors.ConfigError("invalid config:\n  " + "\n  ".join(problems))
  # The inputs' mistakes before the weights are read.
  predict_lib.check_output(images, output)
  paths.writable_directory(output, "--output")  # A file, read-only, full: before the model.
  predict_lib.find_images(images)
  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = load_params_for_eval(config, workdir, mesh)
  dataset = data_lib.dataset_info(config.data)
  settings = evaluators_lib.EVALUATORS[config.eval.run[0]].eval_settings(config, dataset)
  predict_fn = evaluators_lib.make_predict_fn(config.model)
  topk = config.model.topk if decoder_spec(config.model).selects_topk else None
  written = predict_lib.predict_images(
      evaluators_lib.stops_on_signal(functools.partial(predict_fn, params)), images,
      output, settings, palette=dataset.palette, class_names=dataset.class_names, topk=topk,
      mesh=mesh, data_axis=sharding_lib.BATCH_AXES,
      batching=batching_lib.Batching.for_predict(config.eval))
  failed = [w for w in written if "error" in w]
  logging.info("predicted %d images with %s into %s", len(written) - len(failed), source,
               output)
  _track_predictions(config, workdir or output, written, checkpoint_step(source))
  if failed:
    raise errors.DataError(
        f"{len(failed)} of {len(written)} images could not be read (the pictures of the "
        f"others are in {output}): " + "; ".join(w["error"] for w in failed[:5])
        + ("; ..." if len(failed) > 5 else ""))
  return written


def _track_predictions(config, directory, written, step: int) -> None:
  """The first `logging.tensorboard_images` overlays with their legends to
  DIRECTORY/tensorboard/predict (the workdir's, else the output's) and W&B."""
  n = config.logging.tensorboard_images
  pictures = [w["overlay_legend"] for w in written if "overlay_legend" in w][:n]
  if not pictures or not distributed.is_main_process():
    return
  tracker = tracking.open_tracker(
      config, directory, job_type="predict",
      tensorboard_dir=epath.Path(directory) / "tensorboard" / "predict")
  try:
    tracker.images(step, {f"predict/{epath.Path(p).stem}":
                          np.asarray(Image.open(io.BytesIO(epath.Path(p).read_bytes())))
                          for p in pictures})
  finally:
    tracker.close()
