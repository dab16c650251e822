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

import os
import sys

from absl import app, flags, logging

from mlseg_jax import errors
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py, or "
                                          "configs/NAME.py:runlocal); eval and predict default "
                                          "to the --workdir's config.json.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, TensorBoard, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
_IMAGES = flags.DEFINE_string("images", None, "predict: an image file or a directory.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: where the pictures go.")


def validate_config(config, num_devices: int | None = None) -> None:
  """`configs.validate.validate_config`, imported when called: this module must not import
  JAX before the signal handlers are in (see the end of the file)."""
  from mlseg_jax.configs.validate import validate_config as validate

  validate(config, num_devices)


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
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _no_stale_listings()
  from mlseg_jax import distributed
  from mlseg_jax import preemption

  distributed.initialize()
  config = _checked_config()
  compiles = _compilation(config)
  if _MODE.value == "train":
    try:
      _train(config)
    except preemption.Preempted as stop:
      logging.warning("%s", stop)
      logging.info("%s", compiles.summary())
      preemption.exit(preemption.EXIT_CODE)
    logging.info("%s", compiles.summary())
    logging.info("done")
    preemption.exit(0)
  preemption.uninstall()
  _evaluate_or_predict(config)
  logging.info("%s", compiles.summary())
  logging.info("done")


def _compilation(config):
  """The persistent compilation cache of `config`, and a count of this process's compiles."""
  from mlseg_jax import compilation

  compilation.enable_cache(config.compilation_cache)
  return compilation.CompileCounter()


def _checked_config():
  """--config (or, for eval and predict, the workdir's config.json), validated and, when
  the workdir has a run, checked against the config it was trained with."""
  from mlseg_jax.configs import validate

  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value in ("train", "eval") and not workdir:
    raise errors.UsageError("--workdir is required for train and eval")
  saved = validate.workdir_config(workdir) if workdir else None
  where = f"{workdir}/{validate.CONFIG_FILE}"
  if config is None:
    if saved is None or _MODE.value == "train":
      raise errors.UsageError("--config is required" + (
          "" if _MODE.value == "train" else f" (or a --workdir holding {validate.CONFIG_FILE})"))
    logging.info("using the config of the run in %s", where)
    config = saved
  elif config_flags.get_config_filename(flags.FLAGS["config"]).startswith(_WORKDIR_CONFIG):
    logging.info("using the config of the run in %s, with the command line's overrides", where)
  validate.validate_config(config)
  if _MODE.value == "train" and workdir:
    validate.check_total_steps(config, workdir)
  if saved is not None and config is not saved:
    validate.check_against_workdir(config, saved, where)
  return config


def _train(config):
  from mlseg_jax import paths
  from mlseg_jax import tracking
  from mlseg_jax import train
  from mlseg_jax.evaluation import modes

  # A workdir that is a file, read-only or full: one line now, not a traceback later.
  paths.writable_directory(_WORKDIR.value, "--workdir")
  # One tracker for the training scalars and the periodic evaluations' pictures; training
  # closes it when it ends.
  tracker = tracking.open_tracker(config, _WORKDIR.value, job_type="train")
  evaluate_fn = modes.periodic_eval_fn(config, _WORKDIR.value, tracker=tracker)
  train.train(config, _WORKDIR.value, evaluate_fn=evaluate_fn, tracker=tracker)


def _evaluate_or_predict(config):
  from mlseg_jax import paths
  from mlseg_jax.evaluation import modes

  if _MODE.value == "eval":
    if paths.absolute_path(_WORKDIR.value).exists():  # Its results go to WORKDIR/eval.
      paths.writable_directory(_WORKDIR.value, "--workdir")
    modes.evaluate_checkpoint(config, _WORKDIR.value)
  else:
    if not _IMAGES.value or not _OUTPUT.value:
      raise errors.UsageError("--mode predict needs --images and --output")
    modes.predict(config, _WORKDIR.value, _IMAGES.value, _OUTPUT.value)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


# The config file of a workdir's run (configs/workdir.py), for overrides without --config.
_WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "workdir.py")


def with_workdir_config(argv: list[str]) -> list[str]:
  """argv, with `--config=configs/workdir.py:WORKDIR` added where eval or predict has
  overrides (`--config.X=...`) and no `--config`: they apply to the workdir's config, the
  one eval and predict take without `--config` (absl knows the override flags only of a
  `--config` it is given)."""
  has_config = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
  overrides = any(a.startswith("--config.") for a in argv[1:])
  workdir = _flag_value(argv, "workdir")
  if (has_config or not overrides or not workdir
      or _flag_value(argv, "mode") not in ("eval", "predict")):
    return argv
  from etils import epath

  if not (epath.Path(workdir) / "config.json").exists():
    return argv  # The parse says --config is needed.
  return [argv[0], f"--config={_WORKDIR_CONFIG}:{workdir}", *argv[1:]]


if __name__ == "__main__":
  # SIGTERM / Ctrl-C stop training at a step boundary with a checkpoint. First thing,
  # before the config file is read (it imports JAX); main() hands them back for eval and
  # predict, which have nothing to save.
  from mlseg_jax import preemption  # noqa: E402

  preemption.install()
  errors.run(main, argv=with_workdir_config(sys.argv))
