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
import json
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath

from mlseg_jax import checkpoints
from mlseg_jax import data as data_lib
from mlseg_jax import distributed
from mlseg_jax import errors
from mlseg_jax import evaluators as evaluators_lib
from mlseg_jax import metrics as metrics_lib
from mlseg_jax import sharding as sharding_lib
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import abstract_params


def evaluate_params(evaluators: Sequence[evaluators_lib.Evaluator], params, *,
                    workdir=None, step: int | None = None) -> dict[str, float]:
  """Runs each evaluator on `params`, writes its JSON + table to WORKDIR/eval/[step_N_]NAME
  and returns the scalars of all of them (NAME/mIoU, ...)."""
  scalars = {}
  for evaluator in evaluators:
    kind = evaluator.name
    results = dict(evaluator.run(params))
    if workdir is not None and distributed.is_main_process():
      name = f"step_{step}_{kind}" if step is not None else kind
      path = metrics_lib.write_results(results, epath.Path(workdir) / "eval", name)
      logging.info("evaluation written to %s\n%s", path, metrics_lib.format_table(results))
    logging.info("%s mIoU=%.2f aAcc=%.2f mAcc=%.2f (%d images)", kind,
                 100 * results["mIoU"], 100 * results["aAcc"], 100 * results["mAcc"],
                 results["num_images"])
    scalars.update(metrics_lib.tensorboard_scalars(results, prefix=kind))
  return scalars


def periodic_eval_fn(config, workdir) -> Callable[[Any, int], dict[str, float]]:
  """`fn(params, step) -> scalars` for the training loop; its evaluators are built here,
  once, so later evaluations do not trace or compile the forward again."""
  mesh = sharding_lib.make_mesh(config.mesh)
  evaluators = evaluators_lib.build_evaluators(config, mesh)
  return lambda params, step: evaluate_params(evaluators, params, workdir=workdir, step=step)


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
    from mlseg_jax import pretrained

    target = checkpoints.with_shardings(abstract, shardings)
    return pretrained.load_params(config.init_from, target=target), config.init_from
  raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints and no "
                          "--config.init_from: nothing to evaluate")


def evaluate_checkpoint(config, workdir) -> dict[str, float]:
  """`--mode eval`: the scalars go to stdout as JSON (the command's result)."""
  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = load_params_for_eval(config, workdir, mesh)
  evaluators = evaluators_lib.build_evaluators(config, mesh)
  logging.info("evaluating %s", source)
  scalars = evaluate_params(evaluators, params, workdir=workdir)
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
  from mlseg_jax import predict as predict_lib

  problems = evaluators_lib.resolve_eval_config(config)
  if problems:
    raise errors.ConfigError("invalid config:\n  " + "\n  ".join(problems))
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
      windows_per_call=config.eval.windows_per_call)
  failed = [w for w in written if "error" in w]
  logging.info("predicted %d images with %s into %s", len(written) - len(failed), source,
               output)
  if failed:
    raise errors.DataError(
        f"{len(failed)} of {len(written)} images could not be read (the pictures of the "
        f"others are in {output}): " + "; ".join(w["error"] for w in failed[:5])
        + ("; ..." if len(failed) > 5 else ""))
  return written
