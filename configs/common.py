"""The shared base of every config, and `paper_row`: one row of REFERENCE.md §7.

Every number of a run is in `get_base_config()` or in the row's own file; fields are locked,
so a misspelt override (`--config.train.batchsize=4`) fails instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from mlseg_jax import data as data_lib
from mlseg_jax.models.segmenter import default_model_config
from mlseg_jax.optimizer import default_optim_config
from mlseg_jax.sharding import default_mesh_config

# Per dataset: classes, crop-independent data settings and the reference's schedule
# details. Normalisation, ignore and reduce_zero_label live with the dataset reader.
DATASETS = {
    # `root` holds the layout of README's Data table (override with --config.data.root).
    "coco_stuff10k": dict(num_classes=171, root="data/coco_stuff10k"),
    "pascal_context": dict(num_classes=60, root="data/VOCdevkit"),
    "ade20k": dict(num_classes=150, root="data/ade"),
    "ade20k_full": dict(num_classes=847, root="data"),
    "coco_lvis": dict(num_classes=1284, root="data/coco_lvis"),
}

# Schedule length -> evaluation interval (REFERENCE.md §5).
EVAL_EVERY = {40_000: 4_000, 80_000: 8_000, 160_000: 16_000, 320_000: 32_000}

BACKBONE_WIDTHS = {"B/16": (768, 12), "L/16": (1024, 16), "S/16": (384, 6), "Ti/16": (192, 3)}

# The AugReg ImageNet-21k -> 1k 384px checkpoints every paper row starts from (§1), after
# `python -m mlseg_jax.convert --format augreg_npz` into this directory.
PRETRAINED = {
    "B/16": "pretrained/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
    "L/16": "pretrained/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384",
}


def default_eval_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "slide"
  c.stride = (512, 512)  # mmseg test_cfg stride; the window is data.crop_size.
  c.multi_scale = False  # True: ratios below + horizontal flip, softmax averaged.
  c.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.flip = True
  c.windows_per_batch = 8
  # Images whose windows share one jitted call; device memory grows with it times the image
  # size times the class count (keep 1-2 for COCO+LVIS's 1284 classes).
  c.images_per_batch = 2
  # Resized images smaller than the window: 0 pads them to the window (one compilation);
  # 16 cuts them at their own size rounded to the patch, exactly as mmseg feeds them, at one
  # compilation per distinct small size.
  c.small_window_multiple = 0
  c.split = "val"
  c.max_images = 0  # 0: the whole split.
  return c


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = default_model_config()
  config.data = data_lib.default_config()
  config.optim = default_optim_config()
  config.mesh = default_mesh_config()
  config.eval = default_eval_config()

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
  config.reference_miou = ml_collections.ConfigDict()
  config.reference_miou.single_scale = -1.0
  config.reference_miou.multi_scale = -1.0
  config.lock()
  return config


def paper_row(*, dataset: str, backbone: str, crop: int, iters: int, decoder: str,
              topk: int = 0, downsample: int = 8, img_loss: str = "bce",
              gamma_neg: float = 0.0, gamma_pos: float = 0.0, img_loss_weight: float = 0.0,
              weight_decay: float = 0.0, oce: bool = False, miou_ss: float = -1.0,
              miou_ms: float = -1.0) -> ml_collections.ConfigDict:
  """A config of REFERENCE.md §7 from the numbers of its row."""
  config = get_base_config()
  ds = DATASETS[dataset]
  m = config.model
  m.num_classes = ds["num_classes"]
  m.backbone = backbone
  m.img_size = (512, 512) if crop == 480 else (crop, crop)  # Pascal keeps img_size 512.
  m.d_model, m.n_heads = BACKBONE_WIDTHS[backbone]
  m.d_ff = 4 * m.d_model
  m.decoder = decoder
  m.n_layers = 3 if decoder == "mlseg" else 2  # MLSeg: block 0 is the multi-label branch.
  m.topk = topk or 50
  m.downsample = downsample
  m.img_loss, m.gamma_neg, m.gamma_pos = img_loss, gamma_neg, gamma_pos
  m.img_loss_weight = img_loss_weight
  m.oce = oce
  m.oce_start_layer = 11 if backbone == "B/16" else 23

  d = config.data
  d.name = dataset
  d.root = ds["root"]
  d.crop_size = (crop, crop)
  d.img_scale = {512: (2048, 512), 640: (2560, 640), 480: (4160, 520)}[crop]
  d.test_scale = d.img_scale
  config.eval.stride = (crop, crop)

  o = config.optim
  o.weight_decay = weight_decay
  keys = [("pos_embed", 0.0), ("cls_token", 0.0), ("norm", 0.0)]
  if weight_decay and decoder.startswith("mlseg"):
    keys += [("decode_head.blocks.0.", 100.0), ("decode_head.ml_fc", 100.0)]
  o.decay_mult = tuple(keys)

  config.train.total_steps = iters
  config.train.eval_every = EVAL_EVERY[iters]
  config.train.checkpoint_every = EVAL_EVERY[iters]
  config.init_from = PRETRAINED[backbone]
  config.reference_miou.single_scale = miou_ss
  config.reference_miou.multi_scale = miou_ms
  return config
