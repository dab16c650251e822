"""Every check a config passes before anything heavy starts, one line per problem.

`validate_config` raises `errors.ConfigError` listing every field that cannot work: sizes
that are not pairs of positive numbers, counts and intervals below 1, values that do not fit
together (batch and mesh, crop and patch, k and the class count), and fields that nothing
reads for the chosen dataset (a `data.mean` on ADE20K would otherwise be silently ignored).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from etils import epath

from mlseg_jax import errors
from mlseg_jax.configs.common import get_base_config
from mlseg_jax.data import datasets
from mlseg_jax.evaluation.evaluators import resolve_eval_config
from mlseg_jax.evaluation.metrics import BEST_METRICS
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import abstract_params
from mlseg_jax.models.vit import VARIANTS
from mlseg_jax.tracking import logging_problems

# (field, what a pair means): every size the pipeline unpacks as two numbers.
PAIRS = (("data.crop_size", "(h, w)"), ("model.img_size", "(h, w)"),
         ("data.img_scale", "(long, short)"), ("data.test_scale", "(long, short)"),
         ("eval.stride", "(h, w)"))
# Counts that must be at least 1.
POSITIVE = ("model.num_classes", "model.d_model", "model.n_heads", "model.d_ff",
            "model.n_layers", "train.batch_size", "train.total_steps", "train.grad_accum_steps",
            "train.checkpoint_every", "train.eval_every", "train.log_every",
            "train.keep_checkpoints", "data.read_threads")
NON_NEGATIVE = ("train.prefetch", "data.num_workers", "data.prefetch_buffer",
                "eval.max_images", "model.pool_grid")
# data fields only the `folder` and `tfds` readers take; named datasets bring their own.
USER_DATASET_FIELDS = ("num_classes", "ignore_value", "reduce_zero_label", "label_int16",
                       "mean", "std", "class_names")
TFDS_FIELDS = ("tfds_name", "tfds_data_dir", "tfds_image_key", "tfds_label_key")
EVAL_MODES = ("slide",)  # mmseg's test_cfg mode of every paper row.


def _get(config, dotted: str) -> Any:
  node = config
  for key in dotted.split("."):
    node = node[key]
  return node


def _is_pair(value) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _shape_problems(config) -> list[str]:
  problems = []
  for name, meaning in PAIRS:
    value = _get(config, name)
    if not _is_pair(value):
      problems.append(f"{name}={value!r} must be two positive integers {meaning}")
  for name in POSITIVE:
    value = _get(config, name)
    if not isinstance(value, int) or value < 1:
      problems.append(f"{name}={value!r} must be a positive integer")
  for name in NON_NEGATIVE:
    value = _get(config, name)
    if not isinstance(value, int) or value < 0:
      problems.append(f"{name}={value!r} must be 0 or a positive integer")
  d = config.data
  if d.ratio_range and not (len(d.ratio_range) == 2 and 0 < d.ratio_range[0] <= d.ratio_range[1]):
    problems.append(f"data.ratio_range={d.ratio_range!r} must be (low, high) with "
                    "0 < low <= high, or () for none")
  if not 0 < d.cat_max_ratio <= 1:
    problems.append(f"data.cat_max_ratio={d.cat_max_ratio} must be in (0, 1] (1: no test)")
  if not 0 <= d.flip_prob <= 1:
    problems.append(f"data.flip_prob={d.flip_prob} must be in [0, 1]")
  scales = config.eval.scales
  if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
    problems.append(f"eval.scales={scales!r} must be positive ratios of the test scale")
  return problems


def _model_problems(m) -> list[str]:
  problems = []
  patch = VARIANTS[m.backbone][3] if m.backbone in VARIANTS else None
  if patch is None:
    problems.append(f"model.backbone={m.backbone!r} is not one of {sorted(VARIANTS)}")
  try:
    spec = decoder_spec(m)
  except ValueError as e:
    problems.append(str(e))
  else:
    if spec.selects_topk and not 0 < m.topk <= m.num_classes:
      problems.append(f"model.topk={m.topk} must be in [1, model.num_classes={m.num_classes}]")
  if m.n_heads > 0 and m.d_model % m.n_heads:
    problems.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
  if m.oce and m.d_model != (m.backbone_width or (VARIANTS.get(m.backbone, (0,))[0])):
    problems.append("model.oce needs model.d_model equal to the backbone width")
  for name in ("backbone_width", "backbone_depth", "backbone_heads"):
    if m[name] is not None and m[name] < 1:
      problems.append(f"model.{name}={m[name]} must be a positive integer (or None: the "
                      "variant's)")
  return problems


def _patch_problems(config) -> list[str]:
  m, d = config.model, config.data
  if m.backbone not in VARIANTS:
    return []
  patch = VARIANTS[m.backbone][3]
  return [f"{name}={tuple(size)} is not a multiple of the patch size {patch}"
          for name, size in (("data.crop_size", d.crop_size), ("model.img_size", m.img_size))
          if any(s % patch for s in size)]


def _mesh_problems(config, n: int) -> list[str]:
  t = config.train
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data != -1 else n // max(fsdp, 1)
  if data * fsdp != n:
    return [f"mesh.data={config.mesh.data} x mesh.fsdp={fsdp} does not fit {n} devices"]
  if t.batch_size % (data * fsdp):
    return [f"train.batch_size={t.batch_size} is not divisible by the data-parallel "
            f"size {data * fsdp} (mesh data x fsdp)"]
  if (t.batch_size // (data * fsdp)) % t.grad_accum_steps:
    return [f"train.grad_accum_steps={t.grad_accum_steps} does not divide the "
            f"per-device batch {t.batch_size // (data * fsdp)}"]
  return []


def _data_problems(config) -> list[str]:
  m, d = config.model, config.data
  problems = []
  try:
    n_data = datasets.dataset_info(d).num_classes
  except (KeyError, ValueError) as e:
    return [f"data: {e}"]
  try:
    datasets.on_error_mode(d)
  except errors.ConfigError as e:
    problems.append(str(e))
  if n_data != m.num_classes:
    problems.append(f"model.num_classes={m.num_classes} but dataset {d.name!r} has "
                    f"{n_data} classes")
  defaults = datasets.default_config()
  if d.name in datasets.INFOS:
    for name in USER_DATASET_FIELDS:
      if _differs(d[name], defaults[name]):
        problems.append(f"data.{name}={d[name]!r} is read only by the folder and tfds "
                        f"readers; dataset {d.name!r} has its own (leave it unset)")
  if d.name != "tfds":
    for name in TFDS_FIELDS:
      if _differs(d[name], defaults[name]):
        problems.append(f"data.{name}={d[name]!r} is read only when data.name='tfds'")
  return problems


def _differs(value, default) -> bool:
  if isinstance(default, (tuple, list)):
    return tuple(value) != tuple(default)
  return value != default


def _train_problems(config) -> list[str]:
  t = config.train
  if t.best_metric and t.best_metric not in BEST_METRICS:
    return [f"train.best_metric={t.best_metric!r} is not one of {list(BEST_METRICS)} "
            "(or \"\" for none)"]
  return []


# (field, lowest, highest, whether the lowest itself is allowed): rates and factors of the
# recipe outside which training runs but diverges or learns backwards without a word. A
# learning rate of 0 is allowed: it keeps the weights (a check of init_from or the input
# pipeline).
RANGES = (("optim.lr", 0.0, None, True), ("optim.min_lr", 0.0, None, True),
          ("optim.momentum", 0.0, 1.0, True), ("optim.b1", 0.0, 1.0, True),
          ("optim.b2", 0.0, 1.0, True), ("optim.eps", 0.0, None, False),
          ("optim.weight_decay", 0.0, None, True), ("optim.power", 0.0, None, True),
          ("optim.warmup_steps", 0, None, True), ("optim.grad_clip_norm", 0.0, None, True),
          ("model.img_loss_weight", 0.0, None, True), ("model.gamma_neg", 0.0, None, True),
          ("model.gamma_pos", 0.0, None, True), ("model.dropout", 0.0, 1.0, True),
          ("model.drop_path_rate", 0.0, 1.0, True),
          ("model.decoder_drop_path_rate", 0.0, 1.0, True))


def _range_problems(config) -> list[str]:
  problems = []
  for name, low, high, low_ok in RANGES:
    try:
      value = _get(config, name)
    except (AttributeError, KeyError):
      continue  # Not a field of this config.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      problems.append(f"{name}={value!r} must be a number")
      continue
    below = value < low or (value == low and not low_ok)
    if below or (high is not None and value >= high):
      bound = (f"in [{low:g}, {high:g})" if high is not None
               else f">= {low:g}" if low_ok else f"> {low:g}")
      problems.append(f"{name}={value!r} must be {bound}")
  o = config.optim
  if o.name not in ("sgd", "adamw"):
    problems.append(f"optim.name={o.name!r} is not one of ('sgd', 'adamw')")
  if _is_number(o.lr) and _is_number(o.min_lr) and o.min_lr > o.lr >= 0:
    problems.append(f"optim.min_lr={o.min_lr!r} is above optim.lr={o.lr!r}: the schedule "
                    "would raise the rate as training goes on")
  for key, mult in o.decay_mult:
    if not _is_number(mult) or mult < 0:
      problems.append(f"optim.decay_mult: {key!r} has multiplier {mult!r}; it must be >= 0")
  return problems


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eval_problems(config) -> list[str]:
  e, d = config.eval, config.data
  problems = []
  if e.mode not in EVAL_MODES:
    problems.append(f"eval.mode={e.mode!r}: only {EVAL_MODES} (the sliding window every "
                    "paper row is evaluated with) is implemented")
  if _is_pair(e.stride) and _is_pair(d.crop_size) and any(
      s > c for s, c in zip(e.stride, d.crop_size)):
    problems.append(f"eval.stride={tuple(e.stride)} is larger than the window "
                    f"data.crop_size={tuple(d.crop_size)}: pixels would be skipped")
  return problems + resolve_eval_config(config)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """The checks of `validate_config` that a data tool needs (sizes and the data fields),
  without the model's or the mesh's."""
  problems = _shape_problems(config)
  if not problems:
    problems = _data_problems(config)
  if problems:
    raise errors.ConfigError("invalid config:\n  " + "\n  ".join(problems))


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises `errors.ConfigError` naming every field that cannot work (see the module doc).

  num_devices: the devices training runs on (default: all of JAX's).
  """
  problems = _shape_problems(config)
  if problems:  # The other checks read these sizes and counts.
    raise errors.ConfigError("invalid config:\n  " + "\n  ".join(problems))
  if num_devices is None:
    num_devices = jax.device_count()
  for check in (_model_problems(config.model), _patch_problems(config),
                _mesh_problems(config, num_devices), _data_problems(config),
                _train_problems(config), _range_problems(config), _eval_problems(config),
                logging_problems(config.logging)):
    problems += check
  if problems:
    raise errors.ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------
# The config a workdir was trained with (WORKDIR/config.json).

CONFIG_FILE = "config.json"
# data fields that change what the labels or the pixels mean.
DATA_IDENTITY = ("name",) + USER_DATASET_FIELDS


def _as_config_values(value):
  """JSON lists back into the tuples configs hold."""
  if isinstance(value, list):
    return tuple(_as_config_values(v) for v in value)
  return value


def _assign(target: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if key not in target:
      continue  # A field this version no longer has.
    if isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _assign(target[key], value)
    else:
      target[key] = _as_config_values(value)


def workdir_config(workdir) -> ml_collections.ConfigDict | None:
  """The config WORKDIR/config.json records, on the base config's fields, or None."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    values = json.loads(path.read_text())
  except ValueError as e:
    raise errors.ConfigError(f"{path} is not a config written by a run ({e})") from None
  config = get_base_config()
  _assign(config, values)
  return config


def check_total_steps(config: ml_collections.ConfigDict, workdir) -> None:
  """Refuses `train.total_steps` below the step of the workdir's newest checkpoint: the run
  would restore it and stop at once, past the end it was given."""
  directory = epath.Path(workdir) / "checkpoints"
  steps = ([int(p.name) for p in directory.iterdir() if p.name.isdigit()]
           if directory.is_dir() else [])
  total = config.train.total_steps
  if steps and max(steps) > total:
    raise errors.ConfigError(
        f"train.total_steps={total} is below step {max(steps)}, the newest checkpoint in "
        f"{directory}: pass a total_steps of at least {max(steps)} to resume, or --mode eval "
        "to evaluate it")


def _param_shapes(model_config) -> dict:
  return {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_flatten_with_path(abstract_params(model_config))[0]}


def check_against_workdir(config: ml_collections.ConfigDict,
                          saved: ml_collections.ConfigDict, where: str) -> None:
  """Raises `errors.ConfigError` naming every field where `config` and the workdir's
  `saved` config differ in a way that changes the parameter tree or the data."""
  differing = [f"data.{name}" for name in DATA_IDENTITY
               if _differs(config.data[name], saved.data[name])]
  model_fields = [name for name in config.model
                  if _differs(config.model[name], saved.model[name])]
  if model_fields:
    reference = _param_shapes(saved.model)
    for name in model_fields:  # Only those that change a shape or the tree's structure.
      probe = ml_collections.ConfigDict(saved.model.to_dict())
      probe[name] = config.model[name]
      try:
        changes = _param_shapes(probe) != reference
      except Exception:  # noqa: BLE001  (a value the model cannot take changes it too)
        changes = True
      if changes:
        differing.append(f"model.{name}")
  if differing:
    lines = [f"{name}: {_get(config, name)!r} here, {_get(saved, name)!r} in {where}"
             for name in differing]
    raise errors.ConfigError("the config differs from the one the workdir was trained with "
                             "(pass the run's values, or omit --config for eval and "
                             "predict):\n  " + "\n  ".join(lines))
