"""From a config and a workdir to numbers and pictures: `--mode eval`, `--mode predict`,
and the periodic evaluation during training.

Weights come from the workdir's latest training checkpoint, else from `config.init_from`
(a directory written by `mlseg_jax.convert`, loaded strictly: every parameter must be
there, so a backbone-only AugReg conversion is refused here).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from mlseg_jax import checkpoints
from mlseg_jax import data as data_lib
from mlseg_jax import distributed
from mlseg_jax import evaluate as evaluate_lib
from mlseg_jax import metrics as metrics_lib
from mlseg_jax import preemption
from mlseg_jax import sharding as sharding_lib
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import abstract_params, build_model
from mlseg_jax.models.vit import VARIANTS


def _check_supported(config):
  if decoder_spec(config.model).needs_labels:
    raise NotImplementedError(
        "the +GT oracle (model.decoder='mlseg_gt') takes each image's class set from its "
        "labels: predict on unlabelled images is not possible; use --mode eval")


def make_logits_fn(model, params):
  """windows (N, h, w, 3) -> {"logits", ["image_logits"]}, jitted once per window shape."""

  @jax.jit
  def forward(params, windows):
    out = model.apply({"params": params}, windows, train=False)
    keep = {"logits": out["logits"]}
    if "image_logits" in out:
      keep["image_logits"] = out["image_logits"]
    return keep

  return _stops_on_signal(functools.partial(forward, params))


def _stops_on_signal(fn):
  """`fn`, checking before each call whether a signal asks the evaluation to end."""

  def call(windows):
    preemption.check_interrupted()
    return fn(windows)

  return call


class _FirstN(Sequence):
  """The first n records of a dataset, still read lazily."""

  def __init__(self, records, n):
    self.records, self.n = records, min(n, len(records)) if n else len(records)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.records[i]


def _settings(config) -> dict[str, Any]:
  e = config.eval
  ratios, flip = (tuple(e.scales), e.flip) if e.multi_scale else ((1.0,), False)
  return dict(test_scale=tuple(config.data.test_scale), crop=tuple(config.data.crop_size),
              stride=tuple(e.stride), ratios=ratios, flip=flip,
              patch_size=VARIANTS[config.model.backbone][3],
              small_window_multiple=e.small_window_multiple or None,
              windows_per_call=e.windows_per_batch)


def evaluate_oracle(config, params, mesh, records, dataset):
  """The +GT head at test: every window of an image sees the WHOLE image's class set.

  The set differs per image, so images go through the sliding-window evaluator one at a
  time, the set a (replicated) argument of the jitted forward: one compilation serves all.
  Every process walks every record in the same order (the evaluator's contract); each image
  is computed once, by one process.
  """
  model = build_model(config.model)
  n = config.model.num_classes

  @jax.jit
  def forward(params, windows, present):  # present: (n_cls,) bool
    labels = jnp.broadcast_to(present, (windows.shape[0], n))
    return model.apply({"params": params}, windows, train=False, labels=labels)["logits"]

  s = _settings(config)
  settings = evaluate_lib.EvalSettings(
      mean=dataset.mean, std=dataset.std, test_scale=s["test_scale"], crop=s["crop"],
      stride=s["stride"], ratios=s["ratios"], flip=s["flip"], patch_size=s["patch_size"],
      small_window_multiple=s["small_window_multiple"])
  confusion = np.zeros((n, n), np.int64)
  for i in range(len(records)):
    record = records[i]
    label = np.asarray(record["label"])
    present = np.zeros(n, bool)
    present[np.unique(label[label >= 0])] = True
    fn = _stops_on_signal(functools.partial(forward, params, present=jnp.asarray(present)))
    for batch in evaluate_lib.segment(fn, [record], settings, num_classes=n, mesh=mesh,
                                      data_axis=sharding_lib.BATCH_AXES, images_per_batch=1,
                                      windows_per_call=s["windows_per_call"]):
      confusion += batch.confusion
  results = metrics_lib.segmentation_metrics(metrics_lib.sum_across_hosts(confusion),
                                             dataset.class_names)
  results["num_images"] = len(records)
  return results


def evaluate_params(config, params, mesh, *, workdir=None, step=None, name=None):
  """Runs the configured evaluation of `params`; writes JSON + table; returns scalars."""
  dataset = data_lib.get_dataset(config.data, config.eval.split)
  records = _FirstN(dataset, config.eval.max_images)
  spec = decoder_spec(config.model)
  topk = config.model.topk if spec.selects_topk else None
  if spec.needs_labels:
    results = evaluate_oracle(config, params, mesh, records, dataset)
  else:
    results = evaluate_lib.evaluate(
        make_logits_fn(build_model(config.model), params), records,
        num_classes=config.model.num_classes, mean=dataset.mean, std=dataset.std,
        class_names=dataset.class_names, topk=topk, mesh=mesh,
        data_axis=sharding_lib.BATCH_AXES, images_per_batch=config.eval.images_per_batch,
        **_settings(config))
  kind = "ms_flip" if config.eval.multi_scale else "ss"
  if workdir is not None and distributed.is_main_process():
    out = epath.Path(workdir) / "eval"
    name = name or (f"step_{step}_{kind}" if step is not None else kind)
    path = metrics_lib.write_results(results, out, name)
    logging.info("evaluation written to %s\n%s", path, metrics_lib.format_table(results))
  logging.info("%s mIoU=%.2f aAcc=%.2f mAcc=%.2f (%d images)", kind, 100 * results["mIoU"],
               100 * results["aAcc"], 100 * results["mAcc"], len(records))
  return metrics_lib.tensorboard_scalars(results, prefix=kind)


def periodic_eval_fn(config, workdir):
  """`fn(params, step) -> scalars` for the training loop."""
  mesh = sharding_lib.make_mesh(config.mesh)
  return lambda params, step: evaluate_params(config, params, mesh, workdir=workdir, step=step)


def load_params_for_eval(config, workdir, mesh):
  """(params, where they came from): the latest checkpoint in workdir, else init_from."""
  from mlseg_jax import optimizer as optim_lib
  from mlseg_jax import pretrained
  from mlseg_jax import train as train_lib

  model = build_model(config.model)
  abstract = abstract_params(config.model)
  shardings = sharding_lib.tree_shardings(mesh, abstract, config.mesh.rules,
                                          config.mesh.min_fsdp_size)
  if workdir and (epath.Path(workdir) / "checkpoints").exists():
    mngr = checkpoints.checkpoint_manager(workdir, config)
    if mngr.latest_step() is not None:
      tx, _ = optim_lib.make_optimizer(config.optim, abstract, config.train.total_steps)
      state, state_shardings = train_lib.abstract_train_state(config, model, tx, mesh)
      restored, step = checkpoints.restore_latest(mngr, state, state_shardings)
      if restored is not None:
        return restored.params, f"{mngr.directory}/{step}"
  if config.init_from:
    target = checkpoints.with_shardings(abstract, shardings)
    return pretrained.load_params(config.init_from, target=target), config.init_from
  raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints and no "
                          "--config.init_from: nothing to evaluate")


def evaluate_checkpoint(config, workdir):
  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = load_params_for_eval(config, workdir, mesh)
  logging.info("evaluating %s", source)
  scalars = evaluate_params(config, params, mesh, workdir=workdir)
  if distributed.is_main_process():
    print(json.dumps(scalars, indent=2))
  return scalars


def predict(config, workdir, images, output):
  _check_supported(config)
  from mlseg_jax import predict as predict_lib

  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = load_params_for_eval(config, workdir, mesh)
  dataset = data_lib.dataset_info(config.data)
  topk = config.model.topk if decoder_spec(config.model).selects_topk else None
  written = predict_lib.predict_images(
      make_logits_fn(build_model(config.model), params), images, output,
      mean=dataset.mean, std=dataset.std, palette=dataset.palette,
      class_names=dataset.class_names, topk=topk, mesh=mesh,
      data_axis=sharding_lib.BATCH_AXES, **_settings(config))
  logging.info("predicted %d images with %s into %s", len(written), source, output)
  return written
