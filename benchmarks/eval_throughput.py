"""Evaluation throughput (images/s), and how much of the work was needed, single-scale and
multi-scale + flip.

  python benchmarks/eval_throughput.py --tiny                    # tiny random model, anywhere
  python benchmarks/eval_throughput.py --config configs/X.py     # the config's model, random init
  python benchmarks/eval_throughput.py --config configs/X.py \\
      --data-root ../shared/data/ade20k_samples                  # ... on a dataset's val images
  python benchmarks/eval_throughput.py --null --images 2000 --sizes ade20k   # the pipeline alone

With --config, evaluation runs as `--mode eval` runs it: the config's evaluators ("ss",
"ms_flip") with its eval settings (windows per call, images per batch, small windows), the
jitted predict function of `evaluation.evaluators.make_predict_fn`. Weights do not change the speed, so
the model is randomly initialised. --tiny is a 16x16 patch convolution and two 3x3
convolutions (150 classes), --null a forward that computes nothing (zero logits): both make
the numbers mostly the pipeline's own cost (image resize, window cutting, putting logits
back at full resolution, argmax and confusion matrix); with them the geometry is ADE20K's
(test scale 2048x512, window and stride 512) unless flags say otherwise.

Images: a dataset's val split (--data-root, with --config), else random ones, made when
read, of the sizes of --sizes: a list HxW,... cycled, or "ade20k", sizes drawn (seeded) like
ADE20K val's (half of them 512x683 or 683x512, the rest of short side 256-768 and aspect
1-2, either way round).

Each mode runs over the images once to compile every shape, then --reps more times, timed
(the median). Per mode the table gives images/s, the first run's extra seconds, the model
calls, the windows the model computed against those the images have (mmseg's grid at each
test pass), the distinct call sizes (one forward compilation each per window shape) and the
XLA compilations of the first and of the timed runs (all programs, not only the forward: 0
in the timed runs means nothing is recompiled).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from mlseg_jax import IGNORE_LABEL  # noqa: E402
from mlseg_jax import data as data_lib  # noqa: E402
from mlseg_jax import sharding as sharding_lib  # noqa: E402
from mlseg_jax.evaluation import batching  # noqa: E402
from mlseg_jax.evaluation import evaluators as evaluators_lib  # noqa: E402
from mlseg_jax.evaluation import geometry  # noqa: E402
from mlseg_jax.evaluation import runner  # noqa: E402
from mlseg_jax.models.segmenter import build_model  # noqa: E402

HALF = (127.5, 127.5, 127.5)
MODES = {"ss": "single scale", "ms": "multi-scale + flip"}
EVALUATOR_OF_MODE = {"ss": "ss", "ms": "ms_flip"}


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


def null_logits_fn(num_classes: int, patch: int = 16):
  """Zero logits on the padded token grid: the evaluation without a model."""
  return jax.jit(lambda x: jnp.zeros((x.shape[0], -(-x.shape[1] // patch),
                                      -(-x.shape[2] // patch), num_classes), jnp.float32))


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def ade20k_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
  """(h, w) of n images drawn like ADE20K val's: half 512x683 / 683x512 (3:1), the rest of
  short side 256-768 and aspect 1-2, landscape or portrait."""
  rng = np.random.default_rng(seed)
  sizes = []
  for _ in range(n):
    if rng.random() < 0.5:
      sizes.append((512, 683) if rng.random() < 0.75 else (683, 512))
      continue
    short = int(rng.integers(256, 769))
    long = int(short * rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]))
    sizes.append((short, long) if rng.random() < 0.7 else (long, short))
  return sizes


class RandomRecords(Sequence):
  """Random images and labels of the given sizes, made when read (2,000 ADE20K-sized
  images would take 5 GB held at once)."""

  def __init__(self, sizes: Sequence[tuple[int, int]], num_classes: int, seed: int = 0):
    self.sizes, self.num_classes, self.seed = list(sizes), num_classes, seed

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    if not 0 <= i < len(self.sizes):
      raise IndexError(i)
    h, w = self.sizes[i]
    rng = np.random.default_rng((self.seed, i))
    label = rng.integers(0, self.num_classes, (h, w), dtype=np.int32)
    label[: h // 10] = IGNORE_LABEL
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label,
            "name": f"random{i}"}


class CountingForward:
  """predict_fn(params, windows[, classes]), recording the windows of every call."""

  def __init__(self, predict_fn):
    self.predict_fn, self.calls = predict_fn, []

  def __call__(self, params, windows, *rest, **kwargs):
    self.calls.append(tuple(windows.shape[:3]))
    return self.predict_fn(params, windows, *rest, **kwargs)


class CompileCounter:
  """XLA compilations (backend compiles) inside its `with`: JAX's own event."""

  def __init__(self):
    self.count = 0

  def _on_event(self, event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def windows_needed(records: Sequence[dict[str, Any]], settings: geometry.EvalSettings) -> int:
  """Windows of mmseg's grid over every test pass of every image."""
  return sum(p.rows * p.cols for i in range(len(records))
             for p in settings.batch_shape(*records[i]["image"].shape[:2]).passes)


def parse_sizes(text: str, n: int) -> list[tuple[int, int]]:
  if text == "ade20k":
    return ade20k_sizes(n)
  sizes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
  return [sizes[i % len(sizes)] for i in range(n)]


def config_evaluation(args) -> tuple[dict, Any, Any, str]:
  """Per mode, (evaluate() -> results with the config's evaluator, its settings); the
  counting forward, the records, the description."""
  config = load_config(args.config)
  if args.data_root:
    config.data.root = args.data_root
  if args.crop:
    config.data.crop_size = (args.crop, args.crop)
  if args.stride:
    config.eval.stride = (args.stride, args.stride)
  if args.test_scale:
    config.data.test_scale = tuple(int(v) for v in args.test_scale.split(","))
  for name in ("images_per_batch", "windows_per_call", "min_windows_per_call"):
    if getattr(args, name):
      config.eval[name] = getattr(args, name)
  dataset = data_lib.dataset_info(config.data)
  if args.data_root:
    records = evaluators_lib.FirstN(data_lib.get_dataset(config.data, "val"), args.images)
    source = f"{len(records)} val images of {args.data_root}"
  else:
    records = RandomRecords(parse_sizes(args.sizes, args.images), config.model.num_classes)
    source = f"{len(records)} random images of sizes {args.sizes}"
  mesh = sharding_lib.make_mesh(config.mesh)
  model = build_model(config.model)
  h, w = config.model.img_size
  # Labels only for the +GT head, which takes its class set from them.
  params = jax.jit(lambda key: model.init(
      {"params": key, "dropout": key}, jnp.zeros((1, h, w, 3)),
      labels=jnp.zeros((1, h, w), jnp.int32)))(jax.random.key(0))["params"]
  forward = CountingForward(evaluators_lib.make_predict_fn(config.model))
  runs = {}
  for mode in args.modes.split(","):
    evaluator = evaluators_lib.EVALUATORS[EVALUATOR_OF_MODE[mode]](
        forward, config, records, dataset, mesh)
    runs[mode] = (lambda e=evaluator: dict(e.run(params)), evaluator.settings)
  e = config.eval
  describe = (f"model: {os.path.basename(args.config)} (random init); {source}; "
              f"{e.min_windows_per_call}-{e.windows_per_call} windows per call, "
              f"{e.images_per_batch} images per batch, "
              f"small_window_multiple {e.small_window_multiple}")
  return runs, forward, records, describe


def plain_evaluation(args) -> tuple[dict, Any, Any, str]:
  """--tiny / --null: `runner.evaluate` with ADE20K's geometry (or the flags')."""
  num_classes = args.num_classes
  predict = (tiny_logits_fn if args.tiny else null_logits_fn)(num_classes)
  forward = CountingForward(lambda params, x: predict(x))
  test_scale = tuple(int(v) for v in (args.test_scale or "2048,512").split(","))
  crop = (args.crop or 512,) * 2
  stride = (args.stride,) * 2 if args.stride else crop
  records = RandomRecords(parse_sizes(args.sizes, args.images), num_classes)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  options = batching.Batching(images_per_batch=args.images_per_batch or 2,
                              windows_per_call=args.windows_per_call or 8,
                              min_windows_per_call=args.min_windows_per_call or 1)
  common = dict(num_classes=num_classes, mesh=mesh, batching=options)
  shapes = dict(mean=HALF, std=HALF, test_scale=test_scale, crop=crop, stride=stride)
  settings = {"ss": geometry.EvalSettings(**shapes),
              "ms": geometry.EvalSettings(**shapes, ratios=geometry.MS_RATIOS, flip=True)}
  runs = {mode: (functools.partial(runner.evaluate, functools.partial(forward, None), records,
                                   settings[mode], **common), settings[mode])
          for mode in args.modes.split(",")}
  describe = (f"model: {'tiny random' if args.tiny else 'null (zero logits)'}; "
              f"{len(records)} random images of sizes {args.sizes}; crop {crop}, stride "
              f"{stride}, test scale {test_scale}; {options.min_windows_per_call}-"
              f"{options.windows_per_call} windows per call, {options.images_per_batch} "
              "images per batch")
  return runs, forward, records, describe


def measure(run, settings, forward: CountingForward, records, compiles: CompileCounter,
            reps: int) -> dict[str, Any]:
  forward.calls.clear()
  before = compiles.count
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  first_compiles, calls = compiles.count - before, list(forward.calls)
  seconds = []
  before = compiles.count
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - t0)
  # reps=0: the first run's own rate, compilations included.
  t = statistics.median(seconds) if seconds else first
  return dict(images=len(records), images_per_s=len(records) / t, seconds=t,
              first_run_extra_s=first - t, calls=len(calls),
              windows_computed=sum(c[0] for c in calls),
              windows_needed=windows_needed(records, settings),
              call_sizes=sorted(collections.Counter(calls).items()),
              compiles_first=first_compiles,
              compiles_timed=compiles.count - before if reps else None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", help="config file with get_config() and a .model section")
  source.add_argument("--tiny", action="store_true", help="tiny random model")
  source.add_argument("--null", action="store_true", help="no model: zero logits")
  p.add_argument("--data-root", help="with --config: evaluate the val images found here")
  p.add_argument("--images", type=int, default=8, help="images (at most, with --data-root)")
  p.add_argument("--sizes", default="512x683,683x512,375x500,512x512",
                 help="random images' sizes: HxW,... cycled, or 'ade20k'")
  p.add_argument("--num-classes", type=int, default=150, help="classes of --tiny / --null")
  p.add_argument("--test-scale", help="H,W bound (default: the config's, else 2048,512)")
  p.add_argument("--crop", type=int, help="window (default: the config's crop, else 512)")
  p.add_argument("--stride", type=int, help="window stride (default: the config's, else crop)")
  p.add_argument("--images-per-batch", type=int, help="default: the config's, else 2")
  p.add_argument("--windows-per-call", type=int, help="default: the config's, else 8")
  p.add_argument("--min-windows-per-call", type=int, help="default: the config's, else 1")
  p.add_argument("--modes", default="ss,ms", help="ss (single scale), ms (multi-scale+flip)")
  p.add_argument("--reps", type=int, default=1,
                 help="timed runs per mode (the median); 0: only the first run, its rate "
                      "with its compilations")
  args = p.parse_args(argv)
  if args.data_root and not args.config:
    p.error("--data-root needs --config (the dataset and its normalisation)")

  runs, forward, records, describe = (config_evaluation if args.config
                                      else plain_evaluation)(args)
  with CompileCounter() as compiles:
    rows = {mode: measure(run, settings, forward, records, compiles, args.reps)
            for mode, (run, settings) in runs.items()}
  device = jax.devices()[0]
  print(f"{describe}; {len(jax.devices())} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}")
  header = ("mode", "images/s", "first-run extra s", "calls", "windows computed / needed",
            "calls x windows@window size", "compiles first / timed")
  print(" | ".join(header))
  for mode, r in rows.items():
    sizes = ", ".join(f"{n} x {s[0]}@{s[1]}x{s[2]}" for s, n in r["call_sizes"])
    print(f"{MODES[mode]} | {r['images_per_s']:.2f} | {r['first_run_extra_s']:.1f} | "
          f"{r['calls']} | {r['windows_computed']} / {r['windows_needed']} | {sizes} | "
          f"{r['compiles_first']} / {'-' if r['compiles_timed'] is None else r['compiles_timed']}")
  return rows


if __name__ == "__main__":
  main()
