"""Every config loads, builds its model abstractly and carries the reference's numbers."""

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, SHARED_DATA
from mlseg_jax import errors
from mlseg_jax.main import validate_config
from mlseg_jax.models.segmenter import build_model
from mlseg_jax.models.vit import VARIANTS

# REFERENCE.md §7, one line per config:
# name: (dataset, classes, backbone, crop, iters, decoder, k, pool_grid, img loss,
#        gamma_neg, weight, weight decay, oce, mIoU single-scale)
B, L = "B/16", "L/16"
TABLE = {
    "segmenter_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mask_transformer", None, None, None, None, None, 0.0, False, 41.9),
    "segmenter_mlseg_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mlseg", 50, 8, "bce", 0.0, 10.0, 0.0, False, 44.9),
    "segmenter_vit_b16_512_80k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 80_000, "mask_transformer", None, None, None, None, None, 0.0, False, 43.4),
    "segmenter_mlseg_vit_b16_512_80k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 80_000, "mlseg", 50, 8, "bce", 0.0, 5.0, 0.0, False, 45.7),
    "segmenter_vit_l16_640_40k_coco_stuff10k": ("coco_stuff10k", 171, L, 640, 40_000, "mask_transformer", None, None, None, None, None, 0.0, False, 45.5),
    "segmenter_mlseg_vit_l16_640_40k_coco_stuff10k": ("coco_stuff10k", 171, L, 640, 40_000, "mlseg", 50, 8, "asl", 2.0, 10.0, 0.0, False, 46.7),
    "segmenter_vit_b16_480_80k_pascal_context": ("pascal_context", 60, B, 480, 80_000, "mask_transformer", None, None, None, None, None, 0.0, False, 53.8),
    "segmenter_mlseg_vit_b16_480_80k_pascal_context": ("pascal_context", 60, B, 480, 80_000, "mlseg", 25, 8, "asl", 2.0, 5.0, 1e-6, False, 54.7),
    "segmenter_vit_b16_512_160k_ade20k": ("ade20k", 150, B, 512, 160_000, "mask_transformer", None, None, None, None, None, 0.0, False, 48.8),
    "segmenter_mlseg_vit_b16_512_160k_ade20k": ("ade20k", 150, B, 512, 160_000, "mlseg", 50, 8, "asl", 2.0, 10.0, 1e-6, False, 49.7),
    "segmenter_vit_l16_640_160k_ade20k": ("ade20k", 150, L, 640, 160_000, "mask_transformer", None, None, None, None, None, 0.0, False, 52.0),
    "segmenter_mlseg_vit_l16_640_160k_ade20k": ("ade20k", 150, L, 640, 160_000, "mlseg", 50, 8, "asl", 2.0, 10.0, 1e-6, False, 52.6),
    "segmenter_vit_b16_512_160k_ade20k_full": ("ade20k_full", 847, B, 512, 160_000, "mask_transformer", None, None, None, None, None, 0.0, False, 17.8),
    "segmenter_mlseg_vit_b16_512_160k_ade20k_full": ("ade20k_full", 847, B, 512, 160_000, "mlseg", 100, 0, "asl", 2.0, 100.0, 0.0, False, 18.8),
    "segmenter_vit_b16_512_320k_coco_lvis": ("coco_lvis", 1284, B, 512, 320_000, "mask_transformer", None, None, None, None, None, 0.0, False, 19.4),
    "segmenter_mlseg_vit_b16_512_320k_coco_lvis": ("coco_lvis", 1284, B, 512, 320_000, "mlseg", 100, 0, "asl", 2.0, 300.0, 1e-6, False, 21.3),
    "segmenter_vit_b16_640_320k_coco_lvis": ("coco_lvis", 1284, B, 640, 320_000, "mask_transformer", None, None, None, None, None, 0.0, False, 23.7),
    "segmenter_mlseg_vit_b16_640_320k_coco_lvis": ("coco_lvis", 1284, B, 640, 320_000, "mlseg", 100, 0, "asl", 2.0, 300.0, 1e-6, False, 24.9),
    "segmenter_mlseg_gt_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mlseg_gt", None, None, None, None, None, 0.0, False, 66.8),
    "segmenter_mlseg_gt_vit_b16_480_80k_pascal_context": ("pascal_context", 60, B, 480, 80_000, "mlseg_gt", None, None, None, None, None, 0.0, False, 70.8),
    "segmenter_mlseg_gt_vit_b16_512_160k_ade20k": ("ade20k", 150, B, 512, 160_000, "mlseg_gt", None, None, None, None, None, 1e-6, False, 63.6),
    "segmenter_mlseg_gt_vit_b16_512_160k_ade20k_full": ("ade20k_full", 847, B, 512, 160_000, "mlseg_gt", None, None, None, None, None, 0.0, False, 37.0),
    "segmenter_mlseg_gt_vit_b16_512_320k_coco_lvis": ("coco_lvis", 1284, B, 512, 320_000, "mlseg_gt", None, None, None, None, None, 0.0, False, 46.8),
    "segmenter_mlseg_trandec_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mlseg_trandec", 50, 16, "asl", 0.0, 10.0, 0.0, False, 44.1),
    "segmenter_mlseg_pooling_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mlseg_pooling", 50, 16, "asl", 0.0, 10.0, 0.0, False, 43.2),
    "segmenter_oce_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mask_transformer", None, None, None, None, None, 0.0, True, 44.1),
    "segmenter_mlseg_oce_vit_b16_512_40k_coco_stuff10k": ("coco_stuff10k", 171, B, 512, 40_000, "mlseg", 50, 8, "bce", 0.0, 10.0, 0.0, True, 46.0),
    "segmenter_oce_vit_b16_512_160k_ade20k": ("ade20k", 150, B, 512, 160_000, "mask_transformer", None, None, None, None, None, 0.0, True, 48.8),
    "segmenter_mlseg_oce_vit_b16_512_160k_ade20k": ("ade20k", 150, B, 512, 160_000, "mlseg", 50, 8, "asl", 2.0, 10.0, 1e-6, True, 50.1),
}


def _load(name):
  return importlib.import_module(f"mlseg_jax.configs.{name}").get_config()


def test_every_config_file_is_in_the_table():
  files = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "common", "quickstart",
                                                                  "validate", "workdir"}
  assert files == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_config_has_the_reference_numbers(name):
  (dataset, classes, backbone, crop, iters, decoder, k, down, loss, gneg, weight, wd, oce,
   miou) = TABLE[name]
  c = _load(name)
  assert (c.data.name, c.model.num_classes, c.model.backbone) == (dataset, classes, backbone)
  assert tuple(c.data.crop_size) == (crop, crop) and tuple(c.eval.stride) == (crop, crop)
  assert c.train.total_steps == iters and c.model.decoder == decoder
  assert c.train.batch_size == 8
  o = c.optim
  assert (o.name, o.lr, o.momentum, o.power, o.min_lr, o.warmup_steps) == ("sgd", 0.001, 0.9, 0.9, 1e-5, 0)
  assert o.weight_decay == wd
  keys = dict(o.decay_mult)
  assert keys["pos_embed"] == keys["cls_token"] == keys["norm"] == 0.0
  if wd and decoder.startswith("mlseg"):
    assert keys["decode_head.blocks.0."] == keys["decode_head.ml_fc"] == 100.0
  else:
    assert set(keys) == {"pos_embed", "cls_token", "norm"}
  m = c.model
  assert m.drop_path_rate == 0.1 and m.dropout == 0.1 and m.oce == oce
  assert m.n_layers == (3 if decoder == "mlseg" else 2)
  assert tuple(m.img_size) == ((512, 512) if crop == 480 else (crop, crop))
  if k is not None:
    assert (m.topk, m.pool_grid, m.img_loss, m.gamma_neg, m.img_loss_weight) == (k, down, loss, gneg, weight)
  assert tuple(c.data.img_scale) == {512: (2048, 512), 640: (2560, 640), 480: (4160, 520)}[crop]
  assert c.data.ratio_range == (0.5, 2.0) and c.data.cat_max_ratio == 0.75
  # RandomCrop's ignore_index 255 in every reference config: class 255 on the -1 datasets.
  assert c.data.crop_ignore_label == (255 if dataset in ("ade20k_full", "coco_lvis") else -1)
  assert c.reference_miou.single_scale == miou
  # Pascal-Context MLSeg's reference dataset file turns on multi-scale + flip for val.
  assert tuple(c.eval.run) == (("ss", "ms_flip") if name == "segmenter_mlseg_vit_b16_480_80k_pascal_context"
                               else ("ss",))
  assert c.train.eval_every == iters // 10
  validate_config(c, num_devices=8)


@pytest.mark.parametrize("name", sorted(TABLE) + ["quickstart"])
def test_config_builds_its_model_abstractly(name):
  c = _load(name)
  model = build_model(c.model)
  h, w = c.data.crop_size
  images, labels = jnp.zeros((1, h, w, 3)), jnp.zeros((1, h, w), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, labels=labels))
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert n > (250e6 if c.model.backbone == "L/16" else 80e6) or name == "quickstart"
  out = jax.eval_shape(lambda v: model.apply(v, images, labels=labels), shapes)
  patch = VARIANTS[c.model.backbone][3]
  assert out["logits"].shape == (1, h // patch, w // patch, c.model.num_classes)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_runlocal_shrinks_every_row_and_keeps_its_head_and_losses(name):
  full, small = _load(name), importlib.import_module(f"mlseg_jax.configs.{name}").get_config(
      "runlocal")
  validate_config(small, num_devices=8)
  for field in ("decoder", "num_classes", "n_layers", "img_loss", "img_loss_weight", "oce"):
    assert small.model[field] == full.model[field], field
  assert small.data.name == full.data.name and small.init_from == ""
  assert small.train.total_steps <= 4 and tuple(small.data.crop_size) == (64, 64)
  model = build_model(small.model)
  images, labels = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, labels=labels))
  assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) < 5e6


def test_config_arguments_are_parsed_and_unknown_ones_refused():
  from mlseg_jax.configs import common

  assert common.parse_arg(None).runlocal is False
  assert common.parse_arg("runlocal").runlocal is True
  assert common.parse_arg("runlocal=False").runlocal is False
  with pytest.raises(ValueError, match="'variant' is not one of"):
    common.parse_arg("runlocal,variant=B/16")


@pytest.mark.slow
def test_a_paper_row_runs_locally_on_the_ade20k_samples(tmp_path):
  """`FILE.py:runlocal` trains, checkpoints and evaluates a paper row on the CPU with no
  other override than where its data is."""
  root = SHARED_DATA / "ade20k_samples"
  cmd = [sys.executable, "-m", "mlseg_jax.main", "--workdir", str(tmp_path / "wd"),
         "--config", "configs/segmenter_mlseg_vit_b16_512_160k_ade20k.py:runlocal",
         f"--config.data.root={root}", "--config.data.train_split=validation"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (tmp_path / "wd" / "checkpoints" / "4").is_dir()
  results = json.loads((tmp_path / "wd" / "eval" / "step_4_ss.json").read_text())
  assert results["num_images"] == 2 and len(results["IoU"]) == 150


def test_the_removed_downsample_field_is_refused_naming_pool_grid():
  c = _load("segmenter_mlseg_vit_b16_512_160k_ade20k")
  with pytest.raises(AttributeError) as refused:
    c.model.downsample = 4
  assert errors.describe_flag_error(refused.value, ["main", "--config.model.downsample=4"]) == (
      "config.model.downsample is not a config field; did you mean config.model.pool_grid?")


@pytest.mark.parametrize("field,value,message", [
    ("data.crop_size", (128,), "data.crop_size=(128,) must be two positive integers (h, w)"),
    ("data.test_scale", (512,), "data.test_scale=(512,) must be two positive integers"),
    ("train.batch_size", 0, "train.batch_size=0 must be a positive integer"),
    ("train.batch_size", -2, "train.batch_size=-2 must be a positive integer"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be a positive integer"),
    ("train.eval_every", 0, "train.eval_every=0 must be a positive integer"),
    ("data.num_workers", -1, "data.num_workers=-1 must be 0 or a positive integer"),
    ("data.mean", (0.0, 0.0, 0.0), "data.mean=(0.0, 0.0, 0.0) is read only by the folder and "
                                   "tfds readers; dataset 'camvid' has its own"),
    ("data.reduce_zero_label", True, "data.reduce_zero_label=True is read only by the folder"),
    ("data.tfds_name", "ade", "data.tfds_name='ade' is read only when data.name='tfds'"),
    ("eval.mode", "whole", "eval.mode='whole': only ('slide',)"),
    ("data.on_error", "drop", "data.on_error='drop' must be one of 'raise', 'skip'"),
    ("eval.scales", (), "eval.scales=() must be positive ratios"),
])
def test_config_mistakes_name_the_field_and_what_is_expected(field, value, message):
  from mlseg_jax.errors import ConfigError

  c = _load("quickstart")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError) as raised:
    validate_config(c, num_devices=8)
  assert message in str(raised.value), str(raised.value)
  assert len(str(raised.value).splitlines()) == 2  # "invalid config:" and this one.
