r"""Performance benchmark: `python -m mlseg_jax.bench --config configs/NAME.py`.

One run on whatever accelerator is present (GPU, TPU or the CPU) measures, in this order:

  1. The peer (with torch + timm importable, in a subprocess started before JAX takes the
     accelerator): the same-sized timm ViT backbone, forward + backward at the same batch and
     resolution, bf16 autocast on CUDA when the config computes in bf16, SDPA attention,
     `torch.compile` (eager on the CPU, where compiling costs more than a tiny run).
  2. `--sweep-batch`: the largest training batch that fits (doubling until the accelerator
     runs out of memory, then bisecting); the benchmark then runs at that batch.
  3. The training step: compiled once (`lower().compile()`), its XLA cost analysis (FLOPs)
     and memory analysis printed, then warm-up and the median of many synchronised steps
     (the donated state threaded through), plus the same steps dispatched back to back.
  4. Our backbone alone, forward + backward, the peer's exact workload (with the peer only).
  5. Single-scale evaluation: the jitted forward over a batch of full-size windows (logits
     upsampled to the window as the reference does), and, when `mlseg_jax.evaluate` is
     present, its whole sliding-window pass over synthetic images of the test scale.
  6. The device's peak: a large matmul in bf16 (and in the model's compute dtype when that
     differs) and a large device-to-device copy, timed back to back, median of several reps.
     Last, so that its buffers do not count in the peak memory of the phases above.

MFU = achieved FLOP/s per device / measured matmul peak of the compute dtype, reported two
ways: with XLA's own count of the compiled program (it includes remat recomputation and
elementwise work) and with `model_flops`, the analytic matmul count of the model (the usual
"model FLOPs" definition: no recomputation, 3x the forward for a training step).

`--profile DIR` adds a jax.profiler trace of a few more training steps and a table of the
busiest operations. `--plan` does none of the above: it traces one training step on the
host and prints its memory by parts (parameters, optimizer state, and the activations each
remat policy keeps), for planning a GPU's batch on a laptop.

Output: a table on stdout and, with --json, every number in a JSON file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Optional

# Config files import `configs.common`: make the repository root importable wherever the
# command is started from.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402

# Sizes of the peak measurements per platform: a matmul big enough to reach the tensor-core
# peak and a copy far larger than any cache; the CPU gets sizes that take well under a second.
PEAK_SIZES = {
    "cpu": dict(matmul=1024, copy_mib=64),
    "gpu": dict(matmul=8192, copy_mib=1024),
    "tpu": dict(matmul=8192, copy_mib=1024),
}
PEAK_REPS = 5  # Medians are taken over this many groups...
PEAK_INNER = 10  # ...of this many calls dispatched back to back (hides launch latency).

PROFILE_STEPS = 3  # Training steps in a --profile trace.

# The selecting MLSeg heads (their losses read the k rank slots, not the n_cls classes).
SELECTING_DECODERS = ("mlseg", "mlseg_trandec", "mlseg_pooling")


# ---------------------------------------------------------------------------------------
# Analytic FLOPs: every matmul / conv / dot-product contraction of the model, 2 FLOPs per
# multiply-add. Not counted: elementwise work (norms, GELU, softmax, the optimizer), the
# position-embedding resize (absent at the training crop), gathers and the loss.


def block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """One pre-norm transformer block over `tokens` tokens, per image.

  qkv 2*n*d*3d + attention logits and values 2 * 2*n*n*d + proj 2*n*d*d + MLP 2 * 2*n*d*f.
  """
  n, d, f = tokens, width, mlp_dim
  return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * f


def backbone_dims(model_config) -> tuple[int, int, int, int]:
  """(width, depth, heads, patch) of the config's ViT, after the tiny-model overrides."""
  from mlseg_jax.models.vit import VARIANTS

  c = model_config
  if c.backbone not in VARIANTS:
    raise ValueError(f"model.backbone={c.backbone!r} is not one of {sorted(VARIANTS)}")
  width, depth, heads, patch = VARIANTS[c.backbone]
  return (c.backbone_width or width, c.backbone_depth or depth, c.backbone_heads or heads,
          patch)


def flop_breakdown(config, image_size=None, *, train: bool = True) -> dict[str, int]:
  """Forward matmul FLOPs of ONE image, per part of the model.

  image_size: (H, W) of the input (default: the training crop). `train` only changes which
  logits are upsampled to the image: the k rank slots the MLSeg loss reads in training,
  all n_cls classes at evaluation.
  """
  m = config.model
  h, w = tuple(image_size) if image_size is not None else tuple(config.data.crop_size)
  width, depth, _, p = backbone_dims(m)
  gh, gw = -(-h // p), -(-w // p)
  n_patch = gh * gw
  n_cls, d, f = m.num_classes, m.d_model, m.d_ff
  out = {}

  # Backbone: patch embedding (a p x p stride-p conv = one matmul per patch) + blocks over
  # [CLS; patches], joined by n_cls class tokens from `oce_start_layer` with OCE.
  out["patch_embedding"] = 2 * n_patch * (p * p * 3) * width
  vit = 0
  for i in range(depth):
    tokens = 1 + n_patch + (n_cls if m.oce and i >= m.oce_start_layer else 0)
    vit += block_flops(tokens, width, 4 * width)
  out["vit_blocks"] = vit

  decoder, masks = 0, 0
  upsampled = n_cls
  if m.decoder == "linear":
    decoder = 2 * n_patch * width * n_cls
  elif m.decoder == "mask_transformer":
    decoder = 2 * n_patch * width * d  # proj_dec
    decoder += m.n_layers * block_flops(n_patch + n_cls, d, f)
    masks = 2 * n_patch * d * d + 2 * n_cls * d * d + 2 * n_patch * n_cls * d
  elif m.decoder == "mlseg_gt":
    # Static shapes: every class token runs, the absent ones masked out of attention.
    decoder = 2 * n_patch * width * d + m.n_layers * block_flops(n_patch + n_cls, d, f)
    masks = 2 * n_patch * d * d + 2 * n_cls * d * d + 2 * n_patch * n_cls * d
  elif m.decoder in SELECTING_DECODERS:
    k, s = m.topk, m.downsample
    decoder = 2 * n_patch * width * d  # proj_dec over the patch tokens
    if m.decoder == "mlseg":
      # Block 0: the class tokens with the s x s pooled tokens (all patches when s = 0),
      # then GroupWiseLinear (one d-dot per class); blocks 1.. segment with the top k.
      if s:
        decoder += 2 * s * s * width * d  # proj_dec over the pooled tokens
      decoder += block_flops((s * s if s else n_patch) + n_cls, d, f)
      decoder += 2 * n_cls * d
      seg_layers = m.n_layers - 1
    else:
      from mlseg_jax.models import mlseg

      pooled = s * s
      if m.decoder == "mlseg_trandec":
        e = mlseg.TRANDEC_FFN
        decoder += 2 * pooled * width * d  # input_proj, a 1x1 conv
        per_layer = (2 * n_cls * d * d + 2 * 2 * pooled * d * d  # q; k and v projections
                     + 2 * 2 * n_cls * pooled * d  # logits and values
                     + 2 * n_cls * d * d + 2 * 2 * n_cls * d * e)  # out_proj; FFN
        decoder += mlseg.TRANDEC_LAYERS * per_layer + 2 * n_cls * d  # + GroupWiseLinear
      else:  # Global pooling: two 1x1 convs on the mean token.
        decoder += 2 * width * width + 2 * width * n_cls
      seg_layers = m.n_layers
    decoder += seg_layers * block_flops(n_patch + k, d, f)
    masks = 2 * n_patch * d * d + 2 * k * d * d + 2 * n_patch * k * d
    if train:
      upsampled = k
  else:
    raise ValueError(f"model.decoder={m.decoder!r}: no FLOP count for it")
  out["decoder"] = decoder
  out["masks"] = masks
  # Bilinear upsampling to the image, two matmuls (rows first, as resize.py does it).
  out["upsample"] = 2 * upsampled * (h * gh * gw + h * w * gw)
  return out


def model_flops(config, batch: int, *, train: bool = True, image_size=None) -> int:
  """Analytic FLOPs of one training step (3x the forward: the backward pass costs two
  forwards) or, with train=False, one forward, over `batch` images."""
  forward = sum(flop_breakdown(config, image_size, train=train).values())
  return batch * forward * (3 if train else 1)


def achieved_tflops(flops: float, seconds: float, num_devices: int = 1) -> float:
  """TFLOP/s per device for `flops` spread evenly over `num_devices` in `seconds`."""
  if seconds <= 0 or num_devices <= 0:
    raise ValueError(f"seconds={seconds} and num_devices={num_devices} must be positive")
  return flops / num_devices / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float, num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved FLOP/s per device over the per-device peak (0..1)."""
  if peak_tflops <= 0:
    raise ValueError(f"peak_tflops={peak_tflops} must be positive")
  return achieved_tflops(flops, seconds, num_devices) / peak_tflops


# ---------------------------------------------------------------------------------------
# XLA's analyses of a compiled program. Backends differ: cost_analysis() may be a dict, a
# list with one dict per program, or None; memory_analysis() may be None.


def xla_flops(compiled) -> Optional[float]:
  """FLOPs of one run of the compiled (per-device, after SPMD partitioning) program."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends raise instead of returning None.
    return None
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    values = [c.get("flops") for c in cost if c]
    values = [v for v in values if v is not None]
    return float(sum(values)) if values else None
  flops = cost.get("flops")
  return None if flops is None or flops < 0 else float(flops)


MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def xla_memory(compiled) -> Optional[dict[str, int]]:
  """Byte sizes from memory_analysis(), plus `total` = arguments + outputs - aliased
  (donated) + temporaries: the program's own peak on one device."""
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return None
  if stats is None:
    return None
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
    if stats is None:
      return None
  out = {}
  for name in MEMORY_FIELDS:
    value = getattr(stats, f"{name}_size_in_bytes", None)
    if value is not None:
      out[name] = int(value)
  if not out:
    return None
  out["total"] = (out.get("argument", 0) + out.get("output", 0) - out.get("alias", 0)
                  + out.get("temp", 0))
  return out


def device_peak_bytes(device) -> Optional[int]:
  """The allocator's peak since the process started, where the backend tracks it."""
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def is_out_of_memory(error: BaseException) -> bool:
  """XLA's resource-exhausted error, at compile time or at run time."""
  text = f"{type(error).__name__}: {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Resource exhausted", "Out of memory",
                                 "out of memory", "OOM"))


# ---------------------------------------------------------------------------------------
# Timing.


def _median(xs):
  return float(statistics.median(xs))


def timing_summary(seconds: list[float]) -> dict[str, float]:
  xs = sorted(seconds)
  return {"median_s": _median(xs), "min_s": xs[0], "max_s": xs[-1],
          "p10_s": float(np.percentile(xs, 10)), "p90_s": float(np.percentile(xs, 90)),
          "n": len(xs)}


def time_back_to_back(fn: Callable[[], Any], inner: int, reps: int) -> list[float]:
  """Seconds per call: `inner` calls dispatched without waiting, then one sync, `reps`
  times. Launch latency overlaps the previous call's work, as in a real program."""
  import jax

  jax.block_until_ready(fn())  # Compile and warm up.
  out = []
  for _ in range(reps):
    start = time.perf_counter()
    results = [fn() for _ in range(inner)]
    jax.block_until_ready(results)
    out.append((time.perf_counter() - start) / inner)
    del results
  return out


# ---------------------------------------------------------------------------------------
# The device's peak.


def measure_matmul_peak(n: int, dtype: str, device, inner: int = PEAK_INNER,
                        reps: int = PEAK_REPS) -> dict[str, Any]:
  """TFLOP/s of an (n, n) @ (n, n) product in `dtype` on `device`."""
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32).astype(dtype), device)
          for k in keys)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds = time_back_to_back(lambda: matmul(a, b), inner, reps)
  t = _median(seconds)
  return {"dtype": str(jnp.dtype(dtype)), "n": n, "seconds": t,
          "tflops": 2 * n ** 3 / t / 1e12, "tflops_best": 2 * n ** 3 / min(seconds) / 1e12}


def measure_copy_bandwidth(mib: int, device, inner: int = PEAK_INNER,
                           reps: int = PEAK_REPS) -> dict[str, Any]:
  """GB/s of a device-to-device copy of `mib` MiB, counting bytes read + written."""
  import jax
  import jax.numpy as jnp

  x = jax.device_put(jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32), device)
  copy = jax.jit(jnp.copy)  # A real copy: without donation the output cannot alias x.
  seconds = time_back_to_back(lambda: copy(x), inner, reps)
  t = _median(seconds)
  return {"bytes": int(x.nbytes), "seconds": t, "gb_per_s": 2 * x.nbytes / t / 1e9}


# ---------------------------------------------------------------------------------------
# Synthetic data.


def synthetic_batch(config, batch: int, seed: int = 0, image_size=None) -> dict[str, np.ndarray]:
  """Normalised-looking images and labels in 8x8 blocks with some ignore pixels."""
  from mlseg_jax import IGNORE_LABEL

  h, w = tuple(image_size) if image_size is not None else tuple(config.data.crop_size)
  rng = np.random.default_rng(seed)
  n_cls = config.model.num_classes
  labels = rng.integers(0, n_cls, size=(batch, -(-h // 8), -(-w // 8)), dtype=np.int32)
  labels = labels.repeat(8, 1).repeat(8, 2)[:, :h, :w]
  labels[:, :h // 16] = IGNORE_LABEL
  images = rng.standard_normal((batch, h, w, 3), dtype=np.float32)
  return {"image": images, "label": np.ascontiguousarray(labels)}


# ---------------------------------------------------------------------------------------
# Training step.


def bench_config(config, batch: int):
  """A copy of `config` training at global batch `batch`."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch
  return config


def bench_train(config, batch: int, mesh, steps: int, warmup: int,
                profile_dir: str = "") -> tuple[dict, Any]:
  """Compiles and times the training step at global batch `batch`; returns (results,
  trained params) -- the params are reused by the other phases. With `profile_dir`, a
  profiler trace of PROFILE_STEPS more steps goes there."""
  import jax

  from mlseg_jax import train as train_lib

  config = bench_config(config, batch)
  local = batch // jax.process_count()
  t0 = time.perf_counter()
  model, mesh, state, _, step_fn = train_lib.setup(config, mesh)
  data = train_lib.global_batch(synthetic_batch(config, local, seed=jax.process_index()), mesh)
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  res = {"batch": batch, "setup_s": setup_s, "compile_s": compile_s,
         "xla_flops": xla_flops(compiled), "memory": xla_memory(compiled)}

  for _ in range(warmup):
    state, metrics = compiled(state, data)
  jax.block_until_ready(state)
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)  # The state is donated: thread it through.
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
  res["timing"] = timing_summary(seconds)
  # The same steps dispatched back to back, one sync at the end: the training loop's view
  # (metrics stay on device, the next step is queued while this one runs).
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, data)
  jax.block_until_ready(state)
  res["loop_step_s"] = (time.perf_counter() - start) / steps
  res["loss"] = float(jax.device_get(metrics["loss"]))
  res["device_peak_bytes"] = device_peak_bytes(mesh.devices.flat[0])
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILE_STEPS):
        state, metrics = compiled(state, data)
      jax.block_until_ready(state)
    res["profile"] = profile_summary(profile_dir, PROFILE_STEPS)
  params = state.params
  del state, metrics, compiled, data
  gc.collect()
  return res, (model, params)


def largest_fitting_batch(fits: Callable[[int], bool], start: int, limit: int,
                          granularity: int = 1) -> tuple[Optional[int], dict[int, bool]]:
  """Largest batch b (a multiple of `granularity`) in [start, limit] with fits(b): doubling
  from `start` until one does not fit, then bisecting the gap down to
  max(granularity, last fit / 8). Returns (largest or None, {batch: fits} of every probe)."""
  if start <= 0 or start % granularity:
    raise ValueError(f"start batch {start} must be a positive multiple of {granularity}")
  tried: dict[int, bool] = {}
  fit, fail = None, None
  b = start
  while b <= limit:
    tried[b] = fits(b)
    if not tried[b]:
      fail = b
      break
    fit = b
    b *= 2
  if fit is None or fail is None:
    return fit, tried
  step = max(granularity, fit // 8 // granularity * granularity)
  while fail - fit > step:
    mid = (fit + fail) // 2 // granularity * granularity
    if mid <= fit:
      break
    tried[mid] = fits(mid)
    if tried[mid]:
      fit = mid
    else:
      fail = mid
  return fit, tried


def probe_batch(config, batch: int, mesh) -> bool:
  """Whether two training steps at `batch` run without exhausting device memory."""
  import jax

  from mlseg_jax import train as train_lib

  config = bench_config(config, batch)
  state = data = compiled = None
  try:
    _, mesh, state, _, step_fn = train_lib.setup(config, mesh)
    data = train_lib.global_batch(
        synthetic_batch(config, batch // jax.process_count()), mesh)
    compiled = step_fn.lower(state, data).compile()
    for _ in range(2):
      state, _ = compiled(state, data)
    jax.block_until_ready(state)
    return True
  except Exception as e:  # noqa: BLE001  (anything but OOM is re-raised)
    if is_out_of_memory(e):
      return False
    raise
  finally:
    del state, data, compiled
    gc.collect()


# ---------------------------------------------------------------------------------------
# Backbone alone (the peer's workload) and evaluation.


def bench_backbone(model, params, config, batch: int, mesh, steps: int, warmup: int) -> dict:
  """Our ViT forward + backward (gradients of the parameters), what the peer times."""
  import jax
  import jax.numpy as jnp

  from mlseg_jax import sharding as sharding_lib

  backbone = model.backbone
  bparams = params["backbone"]
  images = jax.device_put(synthetic_batch(config, batch)["image"],
                          sharding_lib.batch_sharding(mesh))

  def loss(p, x):
    tokens, _ = backbone.apply({"params": p}, x, train=True,
                               rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.mean(jnp.square(tokens.astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss))
  compiled = grad.lower(bparams, images).compile()
  res = {"batch": batch, "xla_flops": xla_flops(compiled), "memory": xla_memory(compiled)}
  for _ in range(warmup):
    jax.block_until_ready(compiled(bparams, images))
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(bparams, images))
    seconds.append(time.perf_counter() - start)
  res["timing"] = timing_summary(seconds)
  return res


def make_eval_forward(model, window, with_labels: bool):
  """Jitted single-scale forward: windows (N, h, w, 3) -> logits (N, h, w, C) float32,
  upsampled to the window as the reference's slide inference does."""
  import jax

  from mlseg_jax.models.segmenter import upsample_logits

  def forward(params, windows, labels):
    out = model.apply({"params": params}, windows, train=False,
                      labels=labels if with_labels else None)
    return upsample_logits(out["logits"], window)

  return jax.jit(forward)


def bench_eval_forward(model, params, config, batch: int, mesh, steps: int,
                       warmup: int) -> dict:
  import jax

  from mlseg_jax import sharding as sharding_lib

  window = tuple(config.data.crop_size)
  with_labels = config.model.decoder == "mlseg_gt"  # The oracle head reads the labels.
  data = synthetic_batch(config, batch, seed=1)
  sharding = sharding_lib.batch_sharding(mesh)
  windows = jax.device_put(data["image"], sharding)
  labels = jax.device_put(data["label"], sharding)
  forward = make_eval_forward(model, window, with_labels)
  t0 = time.perf_counter()
  compiled = forward.lower(params, windows, labels).compile()
  res = {"batch": batch, "compile_s": time.perf_counter() - t0,
         "xla_flops": xla_flops(compiled), "memory": xla_memory(compiled)}
  for _ in range(warmup):
    jax.block_until_ready(compiled(params, windows, labels))
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, windows, labels))
    seconds.append(time.perf_counter() - start)
  res["timing"] = timing_summary(seconds)
  res["device_peak_bytes_so_far"] = device_peak_bytes(mesh.devices.flat[0])
  return res


def synthetic_eval_records(config, num_images: int) -> list[dict[str, Any]]:
  """uint8 images of 4:3 landscape shape (ADE20K's usual), short side the test scale's."""
  from mlseg_jax import IGNORE_LABEL

  short = min(config.data.test_scale)
  h, w = short, short * 4 // 3
  rng = np.random.default_rng(2)
  records = []
  for i in range(num_images):
    label = rng.integers(0, config.model.num_classes, size=(h, w), dtype=np.int32)
    label[: h // 16] = IGNORE_LABEL
    records.append({"image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
                    "label": label, "name": f"synthetic_{i}"})
  return records


def bench_sliding_window(model, params, config, windows_per_call: int, num_images: int,
                         reps: int = 2) -> dict:
  """`mlseg_jax.evaluate.evaluate`, single scale, on synthetic images; images/s."""
  try:
    from mlseg_jax import evaluate as evaluate_lib
  except ImportError as e:
    return {"skipped": f"mlseg_jax.evaluate is not importable ({e})"}
  if not hasattr(evaluate_lib, "evaluate"):
    return {"skipped": "mlseg_jax.evaluate has no evaluate() entry point"}
  if config.model.decoder == "mlseg_gt":
    return {"skipped": "the +GT head needs each window's labels; the sliding-window "
                       "entry point feeds images only"}
  import inspect

  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  devices = list(np.asarray(jax.devices()).flat) if jax.process_count() > 1 else None
  mesh = Mesh(np.asarray(devices or jax.local_devices()[:1]), ("data",))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  mlseg = config.model.decoder in SELECTING_DECODERS

  @jax.jit
  def logits_fn(windows):
    out = model.apply({"params": params}, windows, train=False)
    if mlseg:
      return {"logits": out["logits"].astype(jnp.float32),
              "image_logits": out["image_logits"].astype(jnp.float32)}
    return out["logits"].astype(jnp.float32)

  d = config.data
  kwargs = dict(num_classes=config.model.num_classes, mean=d.mean, std=d.std,
                test_scale=d.test_scale, crop=d.crop_size, stride=config.eval.stride,
                topk=config.model.topk if mlseg else None, mesh=mesh,
                windows_per_call=windows_per_call,
                patch_size=backbone_dims(config.model)[3])
  accepted = inspect.signature(evaluate_lib.evaluate).parameters
  kwargs = {k: v for k, v in kwargs.items() if k in accepted}
  records = synthetic_eval_records(config, num_images)
  try:
    t0 = time.perf_counter()
    evaluate_lib.evaluate(logits_fn, records, **kwargs)  # Compiles every stage.
    first = time.perf_counter() - t0
    seconds = []
    for _ in range(reps):
      t0 = time.perf_counter()
      evaluate_lib.evaluate(logits_fn, records, **kwargs)
      seconds.append(time.perf_counter() - t0)
  except Exception as e:  # noqa: BLE001  (a module in flux must not sink the benchmark)
    if is_out_of_memory(e):
      raise
    return {"skipped": f"mlseg_jax.evaluate.evaluate failed: {type(e).__name__}: {e}"}
  h, w = records[0]["image"].shape[:2]
  t = _median(seconds)
  return {"images": num_images, "image_size": [h, w], "windows_per_call": windows_per_call,
          "devices": int(mesh.devices.size), "first_run_s": first, "seconds": t,
          "images_per_s": num_images / t}


# ---------------------------------------------------------------------------------------
# The PyTorch peer (runs in its own process: see the module docstring).


def torch_peer(width: int, depth: int, heads: int, patch: int, image_size, batch: int,
               steps: int, warmup: int, bf16: bool, drop_path_rate: float = 0.0,
               compile_mode: str = "auto", threads: int = 0) -> dict[str, Any]:
  """timm ViT forward + backward at `batch` x `image_size`; seconds per step (median).

  threads: torch's intra-op CPU threads (0: torch's default). On a CPU shared with other
  work, OpenMP threads spinning at barriers can make a step 100x slower; 1 avoids that.
  """
  import torch
  import timm  # noqa: F401  (timm's VisionTransformer below)
  from timm.models.vision_transformer import VisionTransformer

  if threads:
    torch.set_num_threads(threads)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  model = VisionTransformer(img_size=tuple(image_size), patch_size=patch, embed_dim=width,
                            depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                            num_classes=0, global_pool="", drop_path_rate=drop_path_rate)
  model = model.to(device).train()
  fused = all(getattr(b.attn, "fused_attn", False) for b in model.blocks)
  notes = []
  compile_on = compile_mode == "on" or (compile_mode == "auto" and cuda)
  if compile_mode == "auto" and not cuda:
    notes.append("torch.compile skipped on the CPU (compiling costs more than the run)")
  images = torch.randn(batch, 3, *image_size, device=device)
  use_amp = cuda and bf16

  def step(m):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
      tokens = m(images)
    loss = tokens.float().square().mean()
    loss.backward()
    for p in m.parameters():
      p.grad = None

  def sync():
    if cuda:
      torch.cuda.synchronize()

  runner = model
  compile_s = None
  if compile_on:
    try:
      runner = torch.compile(model)
      t0 = time.perf_counter()
      step(runner)
      sync()
      compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
      notes.append(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); eager")
      runner, compile_on = model, False
  for _ in range(warmup):
    step(runner)
  sync()
  seconds = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step(runner)
    sync()
    seconds.append(time.perf_counter() - t0)
  res = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
         "cuda": cuda,
         "torch_version": torch.__version__, "timm_version": timm.__version__,
         "batch": batch, "image_size": list(image_size), "compiled": compile_on,
         "compile_s": compile_s, "autocast_bf16": use_amp, "sdpa_attention": fused,
         "cpu_threads": torch.get_num_threads(),
         "timing": timing_summary(seconds), "notes": notes}
  if cuda:
    res["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  return res


def run_torch_peer(config, batch: int, steps: int, warmup: int, compile_mode: str,
                   threads: int = 0, timeout_s: int = 1800) -> dict[str, Any]:
  """`torch_peer` in a subprocess (its own CUDA libraries and memory), when importable."""
  import importlib.util

  for name in ("torch", "timm"):
    if importlib.util.find_spec(name) is None:
      return {"skipped": f"{name} is not installed"}
  width, depth, heads, patch = backbone_dims(config.model)
  kwargs = dict(width=width, depth=depth, heads=heads, patch=patch,
                image_size=list(config.data.crop_size), batch=batch, steps=steps,
                warmup=warmup, bf16=config.model.dtype == "bfloat16",
                drop_path_rate=float(config.model.drop_path_rate),
                compile_mode=compile_mode, threads=threads)
  code = textwrap.dedent("""
      import json, sys
      from mlseg_jax.bench import torch_peer
      print("TORCH_PEER " + json.dumps(torch_peer(**json.loads(sys.argv[1]))))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(_REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  try:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=_REPO,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"skipped": f"the torch peer ran past {timeout_s} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("TORCH_PEER "):
      return json.loads(line[len("TORCH_PEER "):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"skipped": f"the torch peer failed (exit {proc.returncode}): " + " | ".join(tail)}


# ---------------------------------------------------------------------------------------
# Profile.


def profile_summary(trace_dir, steps: int, top: int = 15) -> dict[str, Any]:
  """The busiest operations of the newest trace under `trace_dir` (the Chrome-trace file
  jax.profiler writes beside its xplane.pb): device time per operation name summed over
  the accelerator's streams (`/device:...` processes), per step. Without an accelerator
  (the CPU backend) the host's XLA work is all there is; Python frames are left out, and
  its events nest (an executable's run holds its operations), so their shares overlap."""
  import gzip

  traces = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"))
  if not traces:
    return {"trace_dir": str(trace_dir), "error": "no trace file written"}
  events = json.loads(gzip.open(traces[-1]).read())["traceEvents"]
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in process.items() if name.startswith("/device:")}
  totals: dict[str, float] = {}
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if devices and e["pid"] not in devices:
      continue
    if not devices and e["name"].startswith("$"):  # Python frames of the host trace.
      continue
    totals[e["name"]] = totals.get(e["name"], 0.0) + float(e["dur"])
  busy = sum(totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return {"trace": str(traces[-1]), "steps": steps, "scope": "device" if devices else "host",
          "busy_ms_per_step": busy / 1e3 / steps,
          "top": [{"name": n, "ms_per_step": t / 1e3 / steps, "share": t / busy if busy else 0}
                  for n, t in ranked]}


# ---------------------------------------------------------------------------------------
# Memory plan: what a training step keeps, traced on the host without running anything.

_SHORT_DTYPE_BYTES = {"bool": 1, "pred": 1}


def _aval_bytes(short: str) -> int:
  """Bytes of an abstract value printed the short way, e.g. 'bf16[8,1025,768]'."""
  dtype, _, dims = short.partition("[")
  dims = dims.rstrip("]")
  count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
  if dtype in _SHORT_DTYPE_BYTES:
    return count * _SHORT_DTYPE_BYTES[dtype]
  bits = int("".join(ch for ch in dtype if ch.isdigit()) or 0)
  if not bits:
    raise ValueError(f"cannot size {short!r}")
  return count * max(bits // 8, 1)


@contextlib.contextmanager
def _flash_attention_standin():
  """cuDNN's kernel cannot be traced without a GPU. Stand in for it with XLA attention
  behind a custom VJP that keeps what flash attention keeps for the backward pass -- q, k,
  v, the output and per-row softmax statistics -- instead of the (B, heads, N, N)
  probabilities."""
  import jax
  import jax.numpy as jnp

  real = jax.nn.dot_product_attention

  @jax.custom_vjp
  def flash(q, k, v, lengths):
    return real(q, k, v, implementation="xla", key_value_seq_lengths=lengths)

  def flash_fwd(q, k, v, lengths):
    out = flash(q, k, v, lengths)
    # Flash attention's other residual, per-row softmax statistics: only its size matters
    # here (computing it would put dots in the forward that a remat policy could keep).
    stats = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)  # (B, heads, T)
    return out, (q, k, v, lengths, out, stats)

  def flash_bwd(res, g):
    q, k, v, lengths, _, _ = res
    _, vjp = jax.vjp(lambda q, k, v: real(q, k, v, implementation="xla",
                                          key_value_seq_lengths=lengths), q, k, v)
    return (*vjp(g), None)

  flash.defvjp(flash_fwd, flash_bwd)

  def standin(query, key, value, bias=None, mask=None, *, implementation=None,
              key_value_seq_lengths=None, **kwargs):
    if implementation != "cudnn" or bias is not None or mask is not None or kwargs:
      return real(query, key, value, bias, mask, implementation=implementation,
                  key_value_seq_lengths=key_value_seq_lengths, **kwargs)
    if key_value_seq_lengths is None:
      key_value_seq_lengths = jnp.full((query.shape[0],), key.shape[1], jnp.int32)
    return flash(query, key, value, key_value_seq_lengths)

  jax.nn.dot_product_attention = standin
  try:
    yield
  finally:
    jax.nn.dot_product_attention = real


def saved_activation_bytes(config, batch: int) -> int:
  """Bytes the training loss's forward keeps for its backward pass at `batch` images
  (jax's saved residuals, the parameters and the batch excluded): what `model.remat` and
  `model.remat_policy` trade against recomputation. Traced with abstract inputs: no device
  memory is touched. A lower bound of the step's activation memory: the backward's own
  temporaries (one block's recomputation, gradients in flight) come on top."""
  import jax
  import jax.numpy as jnp
  from jax.ad_checkpoint import print_saved_residuals

  from mlseg_jax import train as train_lib
  from mlseg_jax.losses import compute_losses
  from mlseg_jax.models.segmenter import build_model

  model = build_model(config.model)
  with _flash_attention_standin():
    params = train_lib.abstract_params(config, model)
  h, w = config.data.crop_size

  def loss(p):
    images, labels = jnp.zeros((batch, h, w, 3)), jnp.zeros((batch, h, w), jnp.int32)
    out = model.apply({"params": p}, images, train=True, labels=labels,
                      rngs={"dropout": jax.random.PRNGKey(0)})
    return compute_losses(out, labels, config.model)[0]

  printed = io.StringIO()
  with _flash_attention_standin(), contextlib.redirect_stdout(printed):
    print_saved_residuals(loss, params)
  total = 0
  for line in printed.getvalue().splitlines():
    if not line.strip() or "from the argument" in line:
      continue  # The parameters are counted apart.
    total += _aval_bytes(line.split()[0])
  return total


def _tree_bytes(tree) -> int:
  import jax

  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def memory_plan(config, batch: int) -> dict[str, Any]:
  """Training memory at global batch `batch` on one device, by parts: parameters,
  optimizer state, and the saved activations without remat and with each remat policy."""
  from mlseg_jax import optimizer as optim_lib
  from mlseg_jax import train as train_lib
  from mlseg_jax.models.segmenter import build_model
  from mlseg_jax.models.vit import REMAT_POLICIES

  import jax

  config = bench_config(config, batch)
  model = build_model(config.model)
  with _flash_attention_standin():
    params = train_lib.abstract_params(config, model)
  tx, _ = optim_lib.make_optimizer(config.optim, params, config.train.total_steps)

  opt_state = jax.eval_shape(tx.init, params)
  plan = {"batch": batch, "params_bytes": _tree_bytes(params),
          "opt_state_bytes": _tree_bytes(opt_state), "activations_bytes": {}}
  variants = [("none", False, config.model.remat_policy)]
  variants += [(name, True, name) for name in REMAT_POLICIES]
  for label, remat, policy in variants:
    c = config.copy_and_resolve_references()
    c.model.remat, c.model.remat_policy = remat, policy
    plan["activations_bytes"][label] = saved_activation_bytes(c, batch)
  return plan


def format_plan(plan: dict, config) -> str:
  from mlseg_jax.models.segmenter import resolve_attention_impl

  m = config.model
  width, depth, heads, patch = backbone_dims(m)
  state = plan["params_bytes"] * 2 + plan["opt_state_bytes"]  # + the gradients
  lines = [
      f"memory plan: ViT {m.backbone} (width {width}, depth {depth}), {m.decoder}, crop "
      f"{tuple(config.data.crop_size)}, batch {plan['batch']}, {m.dtype}, attention "
      f"{resolve_attention_impl(m.attention_impl, m.dtype)}, optimizer {config.optim.name}",
      f"  parameters {_fmt_bytes(plan['params_bytes'])}, gradients "
      f"{_fmt_bytes(plan['params_bytes'])}, optimizer state "
      f"{_fmt_bytes(plan['opt_state_bytes'])}: {_fmt_bytes(state)}",
      "  | remat policy | saved activations | + parameters, gradients, optimizer state |",
      "  |---|---|---|",
  ]
  for name, act in plan["activations_bytes"].items():
    lines.append(f"  | {name} | {_fmt_bytes(act)} | {_fmt_bytes(act + state)} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The whole run.


@dataclasses.dataclass
class Options:
  batch: int = 8
  steps: int = 20
  warmup: int = 3
  eval_batch: int = 0  # 0: same as batch.
  eval_images: int = 8  # Synthetic images for the sliding-window pass; 0 skips it.
  torch: bool = True
  torch_compile: str = "auto"  # auto (on CUDA only), on, off.
  torch_threads: int = 0  # torch's CPU threads; 0: its default.
  sweep_batch: bool = False
  sweep_max: int = 4096
  devices: int = 0  # 0: every device.
  matmul_size: int = 0  # 0: PEAK_SIZES of the platform.
  copy_mib: int = 0
  profile: str = ""  # A directory: trace PROFILE_STEPS training steps into it.


def _derive(res: dict, analytic: int, peak_tflops: float, n_dev: int, batch: int):
  """Adds per-device rates and both MFUs to a phase's results."""
  t = res["timing"]["median_s"]
  res["analytic_flops"] = analytic
  res["images_per_s"] = batch / t
  res["images_per_s_per_device"] = batch / t / n_dev
  res["tflops_model"] = achieved_tflops(analytic, t, n_dev)
  res["mfu_model"] = mfu(analytic, t, peak_tflops, n_dev)
  if res.get("xla_flops"):
    # XLA analyses the partitioned program: its count is already per device.
    res["tflops_xla"] = achieved_tflops(res["xla_flops"], t, 1)
    res["mfu_xla"] = mfu(res["xla_flops"], t, peak_tflops, 1)


def run(config, opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every measurement of the module docstring; returns the results as a dict."""
  import jax

  from mlseg_jax import sharding as sharding_lib
  from mlseg_jax.main import validate_config
  from mlseg_jax.models.segmenter import resolve_attention_impl

  # 1. The peer, before JAX starts its backend (on GPUs that reserves most of the memory).
  torch_res = {"skipped": "--notorch"}
  if opts.torch:
    log("torch peer: timm ViT forward + backward ...")
    torch_res = run_torch_peer(config, opts.batch, opts.steps, opts.warmup,
                               opts.torch_compile, opts.torch_threads)

  devices = jax.devices()
  if opts.devices:
    if opts.devices > len(devices):
      raise ValueError(f"--devices={opts.devices} but only {len(devices)} are present")
    devices = devices[:opts.devices]
  n_dev = len(devices)
  dev0 = devices[0]
  m = config.model
  width, depth, heads, patch = backbone_dims(m)
  results: dict[str, Any] = {
      "device": {"platform": dev0.platform, "kind": dev0.device_kind, "count": n_dev,
                 "processes": jax.process_count()},
      # CPU timings depend on what else runs on the machine.
      "host": {"cpus": os.cpu_count(), "load_average": _load_average()},  # 1, 5, 15 min
      "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(),
                   "python": platform.python_version()},
      "config": {"backbone": m.backbone, "width": width, "depth": depth, "heads": heads,
                 "patch": patch, "crop": list(config.data.crop_size),
                 "decoder": m.decoder, "num_classes": m.num_classes, "dtype": m.dtype,
                 "attention_impl": resolve_attention_impl(m.attention_impl, m.dtype),
                 "remat": bool(m.remat),
                 "remat_policy": m.remat_policy if m.remat else None,
                 "topk": m.topk if m.decoder in SELECTING_DECODERS else None},
      "options": dataclasses.asdict(opts),
      "torch": torch_res,
  }
  if dev0.platform != "cpu" and m.dtype == "float32":
    log("note: model.dtype is float32; --config.model.dtype=bfloat16 computes in bf16 "
        "(parameters stay float32)")

  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  dp = sharding_lib.data_parallel_size(mesh)
  validate_config(bench_config(config, opts.batch), num_devices=n_dev)
  if (opts.eval_batch or opts.batch) % dp:
    raise ValueError(f"--eval_batch={opts.eval_batch or opts.batch} is not divisible by the "
                     f"data-parallel size {dp}")

  # 2. The largest batch.
  batch = opts.batch
  if opts.sweep_batch:
    log(f"sweep: doubling the batch from {batch} until device memory runs out ...")
    largest, tried = largest_fitting_batch(
        lambda b: probe_batch(config, b, mesh), batch, opts.sweep_max, granularity=dp)
    results["sweep"] = {"tried": {str(b): ok for b, ok in sorted(tried.items())},
                        "largest": largest, "limit": opts.sweep_max}
    log("sweep: " + ", ".join(f"{b}:{'fits' if ok else 'OOM'}" for b, ok in
                              sorted(tried.items())) + f" -> {largest}")
    if largest is None:
      raise RuntimeError(f"batch {batch} does not fit in device memory")
    batch = largest
  validate_config(bench_config(config, batch), num_devices=n_dev)

  # 3. The training step.
  log(f"train: compiling the step at batch {batch} on {n_dev} {dev0.device_kind} ...")
  train_res, (model, params) = bench_train(config, batch, mesh, opts.steps, opts.warmup,
                                           opts.profile)
  results["train"] = train_res
  log(f"train: compiled in {train_res['compile_s']:.1f} s; XLA flops "
      f"{_fmt_num(train_res['xla_flops'])}, memory {_fmt_memory(train_res['memory'])}")

  # 4. Our backbone alone, the peer's workload.
  if "timing" in results["torch"]:
    log("backbone: our ViT forward + backward ...")
    results["backbone"] = bench_backbone(model, params, config, opts.batch, mesh,
                                         opts.steps, opts.warmup)

  # 5. Evaluation.
  eval_batch = opts.eval_batch or batch
  log(f"eval: single-scale forward over {eval_batch} windows ...")
  results["eval"] = bench_eval_forward(model, params, config, eval_batch, mesh, opts.steps,
                                       opts.warmup)
  if opts.eval_images:
    log(f"eval: sliding window over {opts.eval_images} synthetic images ...")
    results["eval_sliding"] = bench_sliding_window(model, params, config, eval_batch,
                                                   opts.eval_images)
  del params
  gc.collect()

  # 6. The peak, last (its buffers would count in the phases' peak memory).
  sizes = PEAK_SIZES.get(dev0.platform, PEAK_SIZES["gpu"])
  n = opts.matmul_size or sizes["matmul"]
  log(f"peak: {n}^3 matmul and a {opts.copy_mib or sizes['copy_mib']} MiB copy ...")
  peak = {"matmul_bfloat16": measure_matmul_peak(n, "bfloat16", dev0)}
  if m.dtype != "bfloat16":
    peak[f"matmul_{m.dtype}"] = measure_matmul_peak(n, m.dtype, dev0)
  peak["compute_dtype"] = m.dtype
  peak["tflops"] = peak[f"matmul_{m.dtype}"]["tflops"]
  peak["copy"] = measure_copy_bandwidth(opts.copy_mib or sizes["copy_mib"], dev0)
  results["peak"] = peak

  _derive(results["train"], model_flops(config, batch, train=True), peak["tflops"], n_dev,
          batch)
  _derive(results["eval"], model_flops(config, eval_batch, train=False), peak["tflops"],
          n_dev, eval_batch)
  results["flop_breakdown"] = {"train_forward_per_image": flop_breakdown(config, train=True),
                               "eval_forward_per_image": flop_breakdown(config, train=False)}
  if "backbone" in results:
    bb = results["backbone"]
    analytic = 3 * opts.batch * sum(
        v for k, v in flop_breakdown(config).items() if k in ("patch_embedding", "vit_blocks"))
    _derive(bb, analytic, peak["tflops"], n_dev, opts.batch)
    torch_t = results["torch"]["timing"]["median_s"]
    results["torch"]["ours_over_torch_backbone"] = bb["timing"]["median_s"] / torch_t
    if batch == opts.batch:
      results["torch"]["ours_step_over_torch_backbone"] = (
          results["train"]["timing"]["median_s"] / torch_t)
  results["host"]["load_average_end"] = _load_average()
  return results


def _load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _jaxlib_version() -> str:
  try:
    import jaxlib

    return jaxlib.__version__
  except Exception:  # noqa: BLE001
    return "?"


# ---------------------------------------------------------------------------------------
# Output.


def _fmt_num(x) -> str:
  if x is None:
    return "n/a"
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _fmt_bytes(x) -> str:
  if x is None:
    return "n/a"
  return f"{x / 2 ** 30:.2f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def _fmt_memory(mem) -> str:
  if not mem:
    return "n/a"
  return ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items())


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(results: dict) -> str:
  d, v, c, p = results["device"], results["versions"], results["config"], results["peak"]
  lines = [
      f"device: {d['count']} x {d['kind']} ({d['platform']}), jax {v['jax']}"
      + (f"; host load average {results['host']['load_average'][0]:.1f} at the start, "
         f"{results['host']['load_average_end'][0]:.1f} at the end, on "
         f"{results['host']['cpus']} CPUs" if d["platform"] == "cpu"
         and results["host"]["load_average"] and results["host"].get("load_average_end")
         else ""),
      f"model: ViT-{c['backbone']} (width {c['width']}, depth {c['depth']}, heads "
      f"{c['heads']}) {c['crop'][0]}x{c['crop'][1]}, decoder {c['decoder']}, dtype "
      f"{c['dtype']}, attention {c['attention_impl']}, remat "
      f"{c.get('remat_policy') or 'off'}",
      f"peak: matmul bf16 {p['matmul_bfloat16']['tflops']:.2f} TFLOP/s"
      + (f", {p['compute_dtype']} {p['tflops']:.2f} TFLOP/s"
         if p["compute_dtype"] != "bfloat16" else "")
      + f" (n={p['matmul_bfloat16']['n']}); copy {p['copy']['gb_per_s']:.1f} GB/s",
      "",
  ]
  header = ("phase", "batch", "time ms", "img/s/dev", "TFLOP/s xla", "MFU xla",
            "TFLOP/s model", "MFU model", "memory")
  rows = []
  for name, label in (("train", "train step"), ("eval", "eval forward"),
                      ("backbone", "ViT fwd+bwd")):
    r = results.get(name)
    if not r:
      continue
    # The allocator's peak only grows: it is the training step's own in the first phase.
    # Later phases show XLA's estimate of their program (arguments + outputs + temps).
    mem = r.get("device_peak_bytes") if name == "train" else None
    mem_txt = (_fmt_bytes(mem) + " peak" if mem else
               (_fmt_bytes(r["memory"]["total"]) + " xla" if r.get("memory") else "n/a"))
    rows.append((label, str(r["batch"]), f"{1e3 * r['timing']['median_s']:.2f}",
                 f"{r['images_per_s_per_device']:.2f}",
                 f"{r['tflops_xla']:.3f}" if "tflops_xla" in r else "n/a",
                 _pct(r.get("mfu_xla")), f"{r['tflops_model']:.3f}", _pct(r["mfu_model"]),
                 mem_txt))
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  fmt = lambda row: "  ".join(s.rjust(w) if i else s.ljust(w)
                              for i, (s, w) in enumerate(zip(row, widths)))
  lines += [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
  lines.append("")
  t = results["train"]
  lines.append(f"train: XLA {_fmt_num(t.get('xla_flops'))} FLOPs/step/device, model "
               f"{_fmt_num(t['analytic_flops'])} FLOPs/step; loop (no per-step sync) "
               f"{1e3 * t['loop_step_s']:.2f} ms/step; compile {t['compile_s']:.1f} s; "
               f"memory analysis: {_fmt_memory(t['memory'])}")
  e = results["eval"]
  lines.append(f"eval forward: XLA {_fmt_num(e.get('xla_flops'))} FLOPs, model "
               f"{_fmt_num(e['analytic_flops'])} FLOPs; memory analysis: "
               f"{_fmt_memory(e['memory'])}")
  s = results.get("eval_sliding")
  if s is not None:
    lines.append("eval sliding window: " + (
        f"skipped ({s['skipped']})" if "skipped" in s else
        f"{s['images_per_s']:.2f} images/s ({s['images']} images of {s['image_size'][0]}x"
        f"{s['image_size'][1]}, {s['windows_per_call']} windows per call, "
        f"{s['devices']} device(s))"))
  tr = results.get("torch", {})
  if "skipped" in tr:
    lines.append(f"torch peer: skipped ({tr['skipped']})")
  elif tr:
    how = ("torch.compile" if tr["compiled"] else "eager") + (
        ", bf16 autocast" if tr["autocast_bf16"] else ", fp32") + (
        ", SDPA" if tr["sdpa_attention"] else ", explicit attention") + (
        "" if tr["cuda"] else f", {tr['cpu_threads']} CPU thread(s)")
    line = (f"torch peer: timm ViT fwd+bwd {1e3 * tr['timing']['median_s']:.2f} ms at batch "
            f"{tr['batch']} ({how}, torch {tr['torch_version']}); ours/theirs: backbone "
            f"{tr['ours_over_torch_backbone']:.3f}")
    if "ours_step_over_torch_backbone" in tr:
      line += (f", our whole training step (decoder, loss, optimizer) "
               f"{tr['ours_step_over_torch_backbone']:.3f}")
    lines.append(line)
    lines += [f"  note: {n}" for n in tr.get("notes", [])]
  prof = results["train"].get("profile")
  if prof and "top" in prof:
    lines.append(f"profile ({prof['trace']}): {prof['scope']} busy "
                 f"{prof['busy_ms_per_step']:.2f} ms per training step; busiest operations:")
    lines += [f"  {op['ms_per_step']:9.3f} ms {100 * op['share']:5.1f} %  {op['name'][:90]}"
              for op in prof["top"]]
  elif prof:
    lines.append(f"profile: {prof['error']} in {prof['trace_dir']}")
  sw = results.get("sweep")
  if sw:
    lines.append(f"largest batch: {sw['largest']} (tried "
                 + ", ".join(f"{b} {'fits' if ok else 'OOM'}" for b, ok in sw["tried"].items())
                 + ")")
  return "\n".join(lines)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, tuple):
    return list(x)
  return str(x)


# ---------------------------------------------------------------------------------------
# Command line.


def _normalise_argv(argv: list[str], bool_flags=("torch", "sweep_batch", "plan")) -> list[str]:
  """Accepts `--sweep-batch` and `--no-torch` spellings beside absl's `--sweep_batch` and
  `--notorch`. `--config.*` overrides are left alone."""
  out = []
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config"):
      name, eq, value = arg[2:].partition("=")
      name = name.replace("-", "_")
      if name.startswith("no_") and name[3:] in bool_flags:
        name = "no" + name[3:]
      arg = f"--{name}{eq}{value}"
    out.append(arg)
  return out


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  # main.py defines --config (a locked config file with --config.* overrides); reuse it,
  # as both modules are imported here (validate_config lives there).
  from mlseg_jax import main as main_lib  # noqa: F401

  defaults = Options()
  fl = {
      "batch": flags.DEFINE_integer("batch", defaults.batch, "Global training batch."),
      "steps": flags.DEFINE_integer("steps", defaults.steps, "Timed steps per phase."),
      "warmup": flags.DEFINE_integer("warmup", defaults.warmup, "Untimed steps first."),
      "eval_batch": flags.DEFINE_integer("eval_batch", defaults.eval_batch,
                                         "Windows per evaluation call (0: the batch)."),
      "eval_images": flags.DEFINE_integer(
          "eval_images", defaults.eval_images,
          "Synthetic images for the sliding-window evaluation (0: skip it)."),
      "torch": flags.DEFINE_boolean("torch", defaults.torch,
                                    "Time the timm/PyTorch peer (--notorch skips it)."),
      "torch_compile": flags.DEFINE_enum("torch_compile", defaults.torch_compile,
                                         ["auto", "on", "off"],
                                         "torch.compile the peer (auto: on CUDA only)."),
      "torch_threads": flags.DEFINE_integer(
          "torch_threads", defaults.torch_threads,
          "The peer's CPU threads (0: torch's default; 1 on a busy shared CPU)."),
      "sweep_batch": flags.DEFINE_boolean(
          "sweep_batch", defaults.sweep_batch,
          "Find the largest batch that fits (doubling from --batch) and benchmark it."),
      "sweep_max": flags.DEFINE_integer("sweep_max", defaults.sweep_max,
                                        "Largest batch the sweep tries."),
      "devices": flags.DEFINE_integer("devices", defaults.devices,
                                      "Use the first N devices (0: all)."),
      "matmul_size": flags.DEFINE_integer("matmul_size", defaults.matmul_size,
                                          "n of the n^3 peak matmul (0: by platform)."),
      "copy_mib": flags.DEFINE_integer("copy_mib", defaults.copy_mib,
                                       "MiB of the bandwidth copy (0: by platform)."),
      "profile": flags.DEFINE_string(
          "profile", defaults.profile,
          "Trace a few training steps into this directory (TensorBoard / Perfetto) and "
          "print the busiest operations."),
  }
  _JSON = flags.DEFINE_string("json", "", "Write every number to this JSON file.")
  _PLAN = flags.DEFINE_boolean(
      "plan", False, "Only the memory plan at --batch: parameters, optimizer state and "
      "the activations each remat policy keeps, traced on the host (no device work).")

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    config = flags.FLAGS.config
    if config is None:
      raise app.UsageError("--config is required")
    opts = Options(**{k: f.value for k, f in fl.items()})
    for name in ("batch", "steps"):
      if getattr(opts, name) < 1:
        raise app.UsageError(f"--{name}={getattr(opts, name)} must be at least 1")
    if _PLAN.value:
      results = {"plan": memory_plan(config, opts.batch)}
      print(format_plan(results["plan"], config), flush=True)
    else:
      results = run(config, opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    results.setdefault("config", {})
    results["config"]["file"] = config_flags.get_config_filename(flags.FLAGS["config"])
    results["config"]["overrides"] = config_flags.get_override_values(flags.FLAGS["config"])
    if not _PLAN.value:
      print(format_table(results), flush=True)
    if _JSON.value:
      path = Path(_JSON.value)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(results, indent=2, default=_json_default))
      print(f"wrote {path}", flush=True)

  app.run(_main, argv=_normalise_argv(list(sys.argv if argv is None else argv)))


if __name__ == "__main__":
  main()
