r"""Entry point: `python -m mlseg_jax.main --config configs/NAME.py --workdir DIR`.

Modes:
  train    train (or resume) the config in --workdir, then evaluate the final weights.
  eval     evaluate the workdir's latest checkpoint (or --config.init_from) on the config's
           validation split; --config.eval.run=ms_flip for multi-scale + flip.
  predict  colour-coded masks and overlays for --images (a file or a directory) in --output.

Overrides: any config field from the command line, e.g. `--config.train.batch_size=16
--config.model.topk=25`. Unknown fields are refused.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, TensorBoard, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
_IMAGES = flags.DEFINE_string("images", None, "predict: an image file or a directory.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: where the pictures go.")


def validate_config(config, num_devices: int | None = None) -> None:
  """Refuses inconsistent values with a message naming the fields."""
  import jax

  from mlseg_jax.models.decoders import decoder_spec
  from mlseg_jax.models.segmenter import resolve_model_config
  from mlseg_jax.models.vit import VARIANTS

  resolve_model_config(config)  # A deprecated field moved to its name first.
  problems = []
  m, d, t = config.model, config.data, config.train
  patch = VARIANTS[m.backbone][3] if m.backbone in VARIANTS else None
  if patch is None:
    problems.append(f"model.backbone={m.backbone!r} is not one of {sorted(VARIANTS)}")
  else:
    for name, size in (("data.crop_size", d.crop_size), ("model.img_size", m.img_size)):
      if any(s % patch for s in size):
        problems.append(f"{name}={tuple(size)} is not a multiple of the patch size {patch}")
  try:
    spec = decoder_spec(m)
  except ValueError as e:
    problems.append(str(e))
  else:
    if spec.selects_topk and not 0 < m.topk <= m.num_classes:
      problems.append(f"model.topk={m.topk} must be in [1, model.num_classes={m.num_classes}]")
  if m.d_model % m.n_heads:
    problems.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
  if m.oce and m.d_model != (m.backbone_width or (VARIANTS.get(m.backbone, (0,))[0])):
    problems.append("model.oce needs model.d_model equal to the backbone width")
  n = jax.device_count() if num_devices is None else num_devices
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data != -1 else n // max(fsdp, 1)
  if data * fsdp != n:
    problems.append(f"mesh.data={config.mesh.data} x mesh.fsdp={fsdp} does not fit {n} devices")
  elif t.batch_size % (data * fsdp):
    problems.append(f"train.batch_size={t.batch_size} is not divisible by the data-parallel "
                    f"size {data * fsdp} (mesh data x fsdp)")
  elif (t.batch_size // (data * fsdp)) % t.grad_accum_steps:
    problems.append(f"train.grad_accum_steps={t.grad_accum_steps} does not divide the "
                    f"per-device batch {t.batch_size // (data * fsdp)}")
  if t.prefetch < 0:
    problems.append(f"train.prefetch={t.prefetch} must be 0 (off) or a number of batches")
  try:
    from mlseg_jax.data import dataset_info

    n_data = dataset_info(d).num_classes
  except (KeyError, ValueError) as e:
    problems.append(f"data: {e}")
  else:
    if n_data != m.num_classes:
      problems.append(f"model.num_classes={m.num_classes} but dataset {d.name!r} has "
                      f"{n_data} classes")
  if t.total_steps <= 0:
    problems.append(f"train.total_steps={t.total_steps} must be positive")
  for name in ("checkpoint_every", "eval_every", "log_every", "keep_checkpoints"):
    if t[name] <= 0:
      problems.append(f"train.{name}={t[name]} must be positive")
  from mlseg_jax.train import BEST_METRICS

  if t.best_metric and t.best_metric not in BEST_METRICS:
    problems.append(f"train.best_metric={t.best_metric!r} is not one of {list(BEST_METRICS)} "
                    "(or \"\" for none)")
  if any(s > c for s, c in zip(config.eval.stride, d.crop_size)):
    problems.append(f"eval.stride={tuple(config.eval.stride)} is larger than the window "
                    f"data.crop_size={tuple(d.crop_size)}: pixels would be skipped")
  from mlseg_jax.evaluators import resolve_eval_config

  problems += resolve_eval_config(config)  # Also moves deprecated eval fields to their names.
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


class _QuietLibraries:
  """Keeps Orbax's and Grain's per-save INFO chatter out of the training log."""

  def filter(self, record):
    return record.levelno >= 30 or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "etils", "gcsfs"))


def _no_stale_listings():
  """gcsfs caches directory listings forever by default: a process would not see the
  checkpoints, evaluations or event files other processes (or TensorStore) wrote since it
  last looked. Every process of a run reads what the others write, so never cache them."""
  try:
    import fsspec
  except ImportError:
    return
  fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _no_stale_listings()
  from mlseg_jax import distributed
  from mlseg_jax import preemption

  distributed.initialize()
  if _MODE.value == "train":
    try:
      _train(_checked_config())
    except preemption.Preempted as stop:
      logging.warning("%s", stop)
      preemption.exit(preemption.EXIT_CODE)
    logging.info("done")
    preemption.exit(0)
  preemption.uninstall()
  _evaluate_or_predict(_checked_config())
  logging.info("done")


def _checked_config():
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  validate_config(config)
  if _MODE.value in ("train", "eval") and not _WORKDIR.value:
    raise app.UsageError("--workdir is required for train and eval")
  return config


def _train(config):
  from mlseg_jax import evaluation_runner
  from mlseg_jax import train

  evaluate_fn = evaluation_runner.periodic_eval_fn(config, _WORKDIR.value)
  train.train(config, _WORKDIR.value, evaluate_fn=evaluate_fn)


def _evaluate_or_predict(config):
  from mlseg_jax import evaluation_runner

  if _MODE.value == "eval":
    evaluation_runner.evaluate_checkpoint(config, _WORKDIR.value)
  else:
    if not _IMAGES.value or not _OUTPUT.value:
      raise app.UsageError("--mode predict needs --images and --output")
    evaluation_runner.predict(config, _WORKDIR.value, _IMAGES.value, _OUTPUT.value)


if __name__ == "__main__":
  # SIGTERM / Ctrl-C stop training at a step boundary with a checkpoint. First thing,
  # before the config file is read (it imports JAX); main() hands them back for eval and
  # predict, which have nothing to save.
  from mlseg_jax import preemption  # noqa: E402

  preemption.install()
  flags.mark_flags_as_required(["config"])
  app.run(main)
