"""The shared base of every config, `paper_row` (one row of REFERENCE.md §7) and `runlocal`.

A row's numbers are the arguments of `paper_row` in its own file; what every row shares is
the recipe block of `paper_row` (REFERENCE.md §5) and the small tables below. Fields are
locked, so a misspelt override (`--config.train.batchsize=4`) fails instead of being ignored.

Every config file's `get_config(arg)` takes the string after the file name:
`--config configs/NAME.py:runlocal` shrinks the row to a CPU smoke run (see `runlocal`).
"""

from __future__ import annotations

import ml_collections

from mlseg_jax import IGNORE_LABEL
from mlseg_jax import data as data_lib
from mlseg_jax.data.datasets import INFOS as DATASET_INFOS
from mlseg_jax.evaluation.evaluators import default_eval_config
from mlseg_jax.models.segmenter import default_model_config
from mlseg_jax.models.vit import VARIANTS
from mlseg_jax.optimizer import default_optim_config
from mlseg_jax.sharding import default_mesh_config
from mlseg_jax.tracking import default_logging_config

# Where each dataset's files are by default (README's Data table; --config.data.root).
# Class counts, label conventions and normalisation come with the dataset reader.
DATA_ROOTS = {
    "coco_stuff10k": "data/coco_stuff10k",
    "pascal_context": "data/VOCdevkit",
    "ade20k": "data/ade",
    "ade20k_full": "data",
    "coco_lvis": "data/coco_lvis",
}

# Crop -> the reference's (long, short) training and test scale (REFERENCE.md §5-6).
IMG_SCALES = {512: (2048, 512), 640: (2560, 640), 480: (4160, 520)}

# Schedule length -> evaluation and checkpoint interval (REFERENCE.md §5).
EVAL_EVERY = {40_000: 4_000, 80_000: 8_000, 160_000: 16_000, 320_000: 32_000}

# The AugReg ImageNet-21k -> 1k 384px checkpoints every paper row starts from (§1), after
# `python -m mlseg_jax.convert --format augreg_npz` into this directory.
PRETRAINED = {
    "B/16": "pretrained/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
    "L/16": "pretrained/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384",
}

# What `get_config(arg)` understands, with its default.
ARGS = {"runlocal": False}


def parse_arg(arg: str | None) -> ml_collections.ConfigDict:
  """`"runlocal"` or `"runlocal=True,..."` -> the ARGS fields; unknown names are refused."""
  args = ml_collections.ConfigDict(dict(ARGS))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in ARGS:
      raise ValueError(f"config argument {key!r} is not one of {sorted(ARGS)} "
                       f"(--config FILE.py:{arg})")
    default = ARGS[key]
    if isinstance(default, bool):
      value = value.strip().lower() in ("", "1", "true", "yes")
    args[key] = type(default)(value)
  return args


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = default_model_config()
  config.data = data_lib.default_config()
  config.optim = default_optim_config()
  config.mesh = default_mesh_config()
  config.eval = default_eval_config()
  config.logging = default_logging_config()  # TensorBoard images, Weights & Biases.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8  # Global: 1 image x 8 GPUs in the reference.
  config.train.total_steps = 160_000
  config.train.grad_accum_steps = 1
  # Device batches a background thread reads ahead (0: read in the loop).
  config.train.prefetch = 2
  config.train.seed = 0
  config.train.log_every = 50
  config.train.checkpoint_every = 4_000
  config.train.keep_checkpoints = 3
  config.train.async_checkpoints = True
  config.train.eval_every = 16_000
  # The periodic evaluation's number that picks the checkpoint kept as the best, besides
  # the last keep_checkpoints (higher is better; "" keeps none).
  config.train.best_metric = "mIoU"

  config.init_from = ""  # Directory of a converted checkpoint (mlseg_jax.convert).
  # JAX's persistent compilation cache (mlseg_jax/compilation.py): local or gs://, shared
  # by a pod's hosts; "" compiles everything in every process.
  config.compilation_cache = "~/.cache/mlseg_jax/jax"
  config.reference_miou = ml_collections.ConfigDict()
  config.reference_miou.single_scale = -1.0
  config.reference_miou.multi_scale = -1.0
  config.lock()
  return config


def paper_row(*, dataset: str, backbone: str, crop: int, iters: int, decoder: str,
              n_layers: int = 2, topk: int = 50, pool_grid: int = 8, img_loss: str = "bce",
              gamma_neg: float = 0.0, gamma_pos: float = 0.0, img_loss_weight: float = 0.0,
              weight_decay: float = 0.0, head_decay_mult: float = 0.0, oce: bool = False,
              miou_ss: float = -1.0, miou_ms: float = -1.0,
              arg: str | None = None) -> ml_collections.ConfigDict:
  """A config of REFERENCE.md §7 from the numbers of its row.

  n_layers counts the decoder's blocks (MLSeg's block 0 is its multi-label branch, so the
  main MLSeg head has 3); head_decay_mult is mmcv's decay_mult for the MLSeg head's block 0
  and multi-label classifier (x100 in the rows that decay weights).
  """
  config = get_base_config()
  _reference_recipe(config)
  width, depth, heads, _ = VARIANTS[backbone]
  m = config.model
  m.num_classes = DATASET_INFOS[dataset].num_classes
  m.backbone = backbone
  m.img_size = (512, 512) if crop == 480 else (crop, crop)  # Pascal keeps img_size 512.
  m.d_model, m.n_heads, m.d_ff = width, heads, 4 * width
  m.decoder = decoder
  m.n_layers = n_layers
  m.topk = topk
  m.pool_grid = pool_grid
  m.img_loss, m.gamma_neg, m.gamma_pos = img_loss, gamma_neg, gamma_pos
  m.img_loss_weight = img_loss_weight
  m.oce = oce
  m.oce_start_layer = depth - 1  # The reference's: the last block (11 for B, 23 for L).

  d = config.data
  d.name = dataset
  d.root = DATA_ROOTS[dataset]
  d.crop_size = (crop, crop)
  d.img_scale = d.test_scale = IMG_SCALES[crop]
  # Every reference config leaves RandomCrop's ignore_index at its default, 255: the
  # ignored pixels where the labels ignore 255, but class 255 where they ignore -1
  # (ADE20K-Full, COCO+LVIS), whose -1 pixels then count as a category in the test.
  d.crop_ignore_label = IGNORE_LABEL if DATASET_INFOS[dataset].labels.ignore_value == 255 else 255
  config.eval.stride = (crop, crop)

  o = config.optim
  o.weight_decay = weight_decay
  keys = [("pos_embed", 0.0), ("cls_token", 0.0), ("norm", 0.0)]
  if head_decay_mult:
    keys += [("decode_head.blocks.0.", head_decay_mult), ("decode_head.ml_fc", head_decay_mult)]
  o.decay_mult = tuple(keys)

  config.train.total_steps = iters
  config.train.eval_every = EVAL_EVERY[iters]
  config.train.checkpoint_every = EVAL_EVERY[iters]
  config.init_from = PRETRAINED[backbone]
  config.reference_miou.single_scale = miou_ss
  config.reference_miou.multi_scale = miou_ms
  if parse_arg(arg).runlocal:
    runlocal(config)
  return config


def _reference_recipe(config: ml_collections.ConfigDict) -> None:
  """What every row of REFERENCE.md §7 shares (§5): written out here, whatever the package
  defaults are, so a row's numbers are its file plus this block."""
  o = config.optim
  o.name, o.lr, o.momentum, o.power, o.min_lr, o.warmup_steps = "sgd", 1e-3, 0.9, 0.9, 1e-5, 0
  o.grad_clip_norm = 0.0
  m = config.model
  m.drop_path_rate, m.dropout, m.decoder_drop_path_rate = 0.1, 0.1, 0.0
  d = config.data
  d.ratio_range, d.cat_max_ratio, d.flip_prob, d.photometric = (0.5, 2.0), 0.75, 0.5, True
  config.train.batch_size = 8  # 1 image x 8 GPUs.


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a run to a CPU smoke test that takes every code path the full run takes.

  The decoder, its losses, the dataset's reader and label conventions stay; the backbone
  becomes 2 blocks of width 64 trained from scratch on 64x64 crops of images resized to
  128x64, for 4 steps with a checkpoint every 2 and an evaluation of 2 images at the end.
  `--config.data.root` still has to point at the dataset.
  """
  m = config.model
  m.backbone_width, m.backbone_depth, m.backbone_heads = 64, 2, 4
  m.d_model, m.n_heads, m.d_ff = 64, 4, 256
  m.img_size = (64, 64)
  m.topk = min(m.topk, m.num_classes)
  m.oce_start_layer = min(m.oce_start_layer, m.backbone_depth - 1)
  d = config.data
  d.crop_size = (64, 64)
  d.img_scale = d.test_scale = (128, 64)
  d.num_workers = 0
  config.eval.stride = (64, 64)
  config.eval.max_images = 2
  t = config.train
  t.total_steps, t.log_every, t.checkpoint_every, t.eval_every = 4, 2, 2, 4
  config.init_from = ""
  return config
