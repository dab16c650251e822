"""What each phase of the benchmark measures: the training step, the largest batch that
fits, our backbone alone, the evaluation forward and sliding window, the torch peer (in its
own process), the device's peak; and the readers of XLA's analyses and of profiler traces.
"""

from __future__ import annotations

import gc
import gzip
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.flops import backbone_dims
from mlseg_jax import IGNORE_LABEL
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import train as train_lib
from mlseg_jax.evaluation import batching
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import runner
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.resize import upsample_logits

REPO = Path(__file__).resolve().parents[1]

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


def median(xs) -> float:
  return float(statistics.median(xs))


def timing_summary(seconds: list[float]) -> dict[str, float]:
  xs = sorted(seconds)
  return {"median_s": median(xs), "min_s": xs[0], "max_s": xs[-1],
          "p10_s": float(np.percentile(xs, 10)), "p90_s": float(np.percentile(xs, 90)),
          "n": len(xs)}


def time_each(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` synchronised calls, after `warmup` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def time_back_to_back(fn: Callable[[], Any], inner: int, reps: int) -> list[float]:
  """Seconds per call: `inner` calls dispatched without waiting, then one sync, `reps`
  times. Launch latency overlaps the previous call's work, as in a real program."""
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
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32).astype(dtype), device)
          for k in keys)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds = time_back_to_back(lambda: matmul(a, b), inner, reps)
  t = median(seconds)
  return {"dtype": str(jnp.dtype(dtype)), "n": n, "seconds": t,
          "tflops": 2 * n ** 3 / t / 1e12, "tflops_best": 2 * n ** 3 / min(seconds) / 1e12}


def measure_copy_bandwidth(mib: int, device, inner: int = PEAK_INNER,
                           reps: int = PEAK_REPS) -> dict[str, Any]:
  """GB/s of a device-to-device copy of `mib` MiB, counting bytes read + written."""
  x = jax.device_put(jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32), device)
  copy = jax.jit(jnp.copy)  # A real copy: without donation the output cannot alias x.
  seconds = time_back_to_back(lambda: copy(x), inner, reps)
  t = median(seconds)
  return {"bytes": int(x.nbytes), "seconds": t, "gb_per_s": 2 * x.nbytes / t / 1e9}


# ---------------------------------------------------------------------------------------
# Synthetic data.


def synthetic_batch(config, batch: int, seed: int = 0, image_size=None) -> dict[str, np.ndarray]:
  """Normalised-looking images and labels in 8x8 blocks with some ignore pixels."""
  h, w = tuple(image_size) if image_size is not None else tuple(config.data.crop_size)
  rng = np.random.default_rng(seed)
  n_cls = config.model.num_classes
  labels = rng.integers(0, n_cls, size=(batch, -(-h // 8), -(-w // 8)), dtype=np.int32)
  labels = labels.repeat(8, 1).repeat(8, 2)[:, :h, :w]
  labels[:, :h // 16] = IGNORE_LABEL
  images = rng.standard_normal((batch, h, w, 3), dtype=np.float32)
  return {"image": images, "label": np.ascontiguousarray(labels)}


def synthetic_eval_records(config, num_images: int) -> list[dict[str, Any]]:
  """uint8 images of 4:3 landscape shape (ADE20K's usual), short side the test scale's."""
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


# ---------------------------------------------------------------------------------------
# Training step and the largest batch.


def with_batch(config, batch: int):
  """A copy of `config` training at global batch `batch`."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch
  return config


def bench_train(config, batch: int, mesh, steps: int, warmup: int,
                profile_dir: str = "") -> tuple[dict, Any]:
  """Compiles and times the training step at global batch `batch`; returns (results,
  (model, trained params)) -- reused by the other phases. With `profile_dir`, a profiler
  trace of PROFILE_STEPS more steps goes there."""
  config = with_batch(config, batch)
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
  config = with_batch(config, batch)
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
  backbone = model.backbone
  bparams = params["backbone"]
  images = jax.device_put(synthetic_batch(config, batch)["image"],
                          sharding_lib.batch_sharding(mesh))

  def loss(p, x):
    tokens, _ = backbone.apply({"params": p}, x, train=True,
                               rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.mean(jnp.square(tokens.astype(jnp.float32)))

  compiled = jax.jit(jax.grad(loss)).lower(bparams, images).compile()
  res = {"batch": batch, "xla_flops": xla_flops(compiled), "memory": xla_memory(compiled)}
  res["timing"] = timing_summary(time_each(lambda: compiled(bparams, images), steps, warmup))
  return res


def make_eval_forward(model, window, with_labels: bool):
  """Jitted single-scale forward: windows (N, h, w, 3) -> logits (N, h, w, C) float32,
  upsampled to the window as the reference's slide inference does."""

  def forward(params, windows, labels):
    out = model.apply({"params": params}, windows, train=False,
                      labels=labels if with_labels else None)
    return upsample_logits(out["logits"], window)

  return jax.jit(forward)


def bench_eval_forward(model, params, config, batch: int, mesh, steps: int,
                       warmup: int) -> dict:
  """The jitted single-scale forward over `batch` full-size windows."""
  window = tuple(config.data.crop_size)
  with_labels = decoder_spec(config.model).needs_labels  # +GT reads the labels.
  data = synthetic_batch(config, batch, seed=1)
  sharding = sharding_lib.batch_sharding(mesh)
  windows = jax.device_put(data["image"], sharding)
  labels = jax.device_put(data["label"], sharding)
  forward = make_eval_forward(model, window, with_labels)
  t0 = time.perf_counter()
  compiled = forward.lower(params, windows, labels).compile()
  res = {"batch": batch, "compile_s": time.perf_counter() - t0,
         "xla_flops": xla_flops(compiled), "memory": xla_memory(compiled)}
  res["timing"] = timing_summary(
      time_each(lambda: compiled(params, windows, labels), steps, warmup))
  res["device_peak_bytes_so_far"] = device_peak_bytes(mesh.devices.flat[0])
  return res


def bench_sliding_window(model, params, config, windows_per_call: int, num_images: int,
                         reps: int = 2) -> dict:
  """`mlseg_jax.evaluation.runner.evaluate`, single scale, on synthetic images; images/s."""
  if decoder_spec(config.model).needs_labels:
    return {"skipped": "the +GT head needs each window's labels; the sliding-window "
                       "entry point feeds images only"}
  devices = list(np.asarray(jax.devices()).flat) if jax.process_count() > 1 else None
  mesh = Mesh(np.asarray(devices or jax.local_devices()[:1]), ("data",))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  mlseg = decoder_spec(config.model).selects_topk

  @jax.jit
  def logits_fn(windows):
    out = model.apply({"params": params}, windows, train=False)
    if mlseg:
      return {"logits": out["logits"].astype(jnp.float32),
              "image_logits": out["image_logits"].astype(jnp.float32)}
    return out["logits"].astype(jnp.float32)

  d = config.data
  records = synthetic_eval_records(config, num_images)

  settings = geometry.EvalSettings(
      mean=d.mean, std=d.std, test_scale=d.test_scale, crop=d.crop_size,
      stride=config.eval.stride, patch_size=backbone_dims(config.model)[3])

  def evaluate():
    return runner.evaluate(
        logits_fn, records, settings, num_classes=config.model.num_classes,
        topk=config.model.topk if mlseg else None, mesh=mesh,
        batching=batching.Batching(windows_per_call=windows_per_call))

  t0 = time.perf_counter()
  evaluate()  # Compiles every stage.
  first = time.perf_counter() - t0
  seconds = []
  for _ in range(reps):
    t0 = time.perf_counter()
    evaluate()
    seconds.append(time.perf_counter() - t0)
  h, w = records[0]["image"].shape[:2]
  t = median(seconds)
  return {"images": num_images, "image_size": [h, w], "windows_per_call": windows_per_call,
          "devices": int(mesh.devices.size), "first_run_s": first, "seconds": t,
          "images_per_s": num_images / t}


# ---------------------------------------------------------------------------------------
# The PyTorch peer, in its own process (benchmarks/torch_peer.py).


def run_torch_peer(config, batch: int, steps: int, warmup: int, compile_mode: str,
                   threads: int = 0, timeout_s: int = 1800) -> dict[str, Any]:
  """`benchmarks.torch_peer` in a subprocess (its own CUDA libraries and memory), at the
  config's backbone size and training crop, when torch and timm are importable."""
  for name in ("torch", "timm"):
    if importlib.util.find_spec(name) is None:
      return {"skipped": f"{name} is not installed"}
  width, depth, heads, patch = backbone_dims(config.model)
  kwargs = dict(width=width, depth=depth, heads=heads, patch=patch,
                image_size=list(config.data.crop_size), batch=batch, steps=steps,
                warmup=warmup, bf16=config.model.dtype == "bfloat16",
                drop_path_rate=float(config.model.drop_path_rate),
                compile_mode=compile_mode, threads=threads)
  try:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_peer", json.dumps(kwargs)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"skipped": f"the torch peer ran past {timeout_s} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("TORCH_PEER "):
      res = json.loads(line[len("TORCH_PEER "):])
      res["timing"] = timing_summary(res.pop("seconds"))
      return res
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
