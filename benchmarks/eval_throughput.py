"""Evaluation throughput (images/s), single-scale and multi-scale + flip.

  python benchmarks/eval_throughput.py --tiny                  # tiny random model, anywhere
  python benchmarks/eval_throughput.py --config configs/X.py   # the config's model, random init

Images are random, of the sizes given by --sizes (default: a mix like ADE20K val, landscape
and portrait). Each mode runs twice over the images: the first run compiles every shape, the
second is timed. Weights do not change the speed, so the config's model is randomly
initialised. The tiny model (a 16x16 patch convolution and two 3x3 convolutions, 150
classes) makes the numbers mostly the pipeline's own cost: image resize, window cutting,
putting logits back at full resolution, argmax and confusion matrix.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from mlseg_jax import IGNORE_LABEL  # noqa: E402
from mlseg_jax import evaluate as ev  # noqa: E402

HALF = (127.5, 127.5, 127.5)


class TinySegmenter(nn.Module):
  """Patch 16 conv + two 3x3 convs + classifier: logits on the padded 1/16 grid."""
  num_classes: int = 150
  width: int = 64

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)))
    x = nn.Conv(self.width, (16, 16), strides=16)(x)
    for _ in range(2):
      x = x + nn.Conv(self.width, (3, 3))(nn.gelu(x))
    return nn.Dense(self.num_classes)(x)


def tiny_logits_fn(num_classes: int):
  model = TinySegmenter(num_classes)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return jax.jit(lambda x: model.apply(params, x))


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_geometry(config) -> dict:
  """Test scale, crop, stride and multi-scale ratios of a config (what `--mode eval` uses)."""
  out = {}
  data, ev_cfg = config.get("data"), config.get("eval")
  if data is not None and "test_scale" in data:
    out["test_scale"] = tuple(data.test_scale)
  if data is not None and "crop_size" in data:
    out["crop"] = tuple(data.crop_size)
  if ev_cfg is not None and "stride" in ev_cfg:
    out["stride"] = tuple(ev_cfg.stride)
  if ev_cfg is not None and "scales" in ev_cfg:
    out["ratios"] = tuple(ev_cfg.scales)
  return out


def config_logits_fn(config, crop: tuple[int, int]):
  """The config's Segmenter (config.model), randomly initialised at the crop size."""
  from mlseg_jax.models.segmenter import build_model

  model = build_model(config.model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *crop, 3)))

  @jax.jit
  def logits_fn(x):
    out = model.apply(params, x)
    keep = {k: out[k] for k in ("logits", "image_logits") if k in out}
    return keep if "image_logits" in keep else keep["logits"]

  topk = config.model.get("topk") if "mlseg" in config.model.decoder else None
  return logits_fn, config.model.num_classes, topk


def random_records(sizes, n, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    label = rng.integers(0, num_classes, (h, w)).astype(np.int32)
    label[rng.random((h, w)) < 0.1] = IGNORE_LABEL
    records.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    "label": label, "name": f"random{i}"})
  return records


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", help="config file with get_config() and a .model section")
  source.add_argument("--tiny", action="store_true", help="tiny random model")
  p.add_argument("--images", type=int, default=8, help="images per timed run")
  p.add_argument("--sizes", default="512x683,683x512,375x500,512x512",
                 help="original image sizes HxW, cycled")
  p.add_argument("--num-classes", type=int, default=150, help="classes of the tiny model")
  p.add_argument("--test-scale", help="H,W bound (default: the config's, else 2048,512)")
  p.add_argument("--crop", type=int, help="window (default: the config's crop, else 512)")
  p.add_argument("--stride", type=int, help="window stride (default: the config's, else crop)")
  p.add_argument("--images-per-batch", type=int, default=2)
  p.add_argument("--windows-per-call", type=int, default=8)
  p.add_argument("--modes", default="ss,ms", help="ss (single scale), ms (multi-scale+flip)")
  args = p.parse_args(argv)

  geometry = dict(test_scale=(2048, 512), crop=(512, 512), stride=None, ratios=ev.MS_RATIOS)
  config = None if args.tiny else load_config(args.config)
  if config is not None:
    geometry.update(config_geometry(config))
  if args.test_scale:
    geometry["test_scale"] = tuple(int(v) for v in args.test_scale.split(","))
  if args.crop:
    geometry["crop"] = (args.crop, args.crop)
  if args.stride:
    geometry["stride"] = (args.stride, args.stride)
  geometry["stride"] = geometry["stride"] or geometry["crop"]
  crop = geometry["crop"]
  if args.tiny:
    logits_fn, num_classes, topk, name = (tiny_logits_fn(args.num_classes), args.num_classes,
                                          None, "tiny random")
  else:
    logits_fn, num_classes, topk = config_logits_fn(config, crop)
    name = os.path.basename(args.config)
  sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
  records = random_records(sizes, args.images, num_classes)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  common = dict(num_classes=num_classes, topk=topk, mesh=mesh,
                images_per_batch=args.images_per_batch, windows_per_call=args.windows_per_call)
  geometry_of = dict(mean=HALF, std=HALF, test_scale=geometry["test_scale"], crop=crop,
                     stride=geometry["stride"])
  modes = {"ss": ev.EvalSettings(**geometry_of),
           "ms": ev.EvalSettings(**geometry_of, ratios=geometry["ratios"], flip=True)}
  rows = []
  for mode in args.modes.split(","):
    run = lambda: ev.evaluate(logits_fn, records, modes[mode], **common)
    compile_s = timed(run)
    seconds = timed(run)
    rows.append((mode, args.images / seconds, compile_s - seconds))
  device = jax.devices()[0]
  print(f"model: {name}; {len(jax.devices())} x {device.device_kind} ({device.platform}); "
        f"{args.images} images of {args.sizes}; crop {crop}, stride {geometry['stride']}, "
        f"test scale {geometry['test_scale']}, ratios {geometry['ratios']}")
  print(f"{'mode':<26} | images/s | first-run extra s (compile)")
  labels = {"ss": "single scale", "ms": f"multi-scale ({len(geometry['ratios'])}) + flip"}
  for mode, rate, extra in rows:
    print(f"{labels[mode]:<26} | {rate:8.2f} | {extra:8.1f}")


if __name__ == "__main__":
  main()
