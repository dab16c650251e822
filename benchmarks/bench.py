r"""Performance benchmark: `python -m benchmarks.bench --config configs/NAME.py`.

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
     upsampled to the window as the reference does), and `mlseg_jax.evaluation.runner.evaluate`'s
     whole sliding-window pass over synthetic images of the test scale.
  6. The device's peak: a large matmul in bf16 (and in the model's compute dtype when that
     differs) and a large device-to-device copy, timed back to back, median of several reps.
     Last, so that its buffers do not count in the peak memory of the phases above.

MFU = achieved FLOP/s per device / measured matmul peak of the compute dtype, reported two
ways: with XLA's own count of the compiled program (it includes remat recomputation and
elementwise work) and with `flops.model_flops`, the analytic matmul count of the model (the
usual "model FLOPs" definition: no recomputation, 3x the forward for a training step).

`--profile DIR` adds a jax.profiler trace of a few more training steps and a table of the
busiest operations. `--plan` does none of the above: it traces one training step on the
host and prints its memory by parts (parameters, optimizer state, and the activations each
remat policy keeps), for planning a GPU's batch on a laptop (`memory_plan.py`).

Output: a table on stdout and, with --json, every number in a JSON file.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jaxlib
from absl import flags
from ml_collections import config_flags

from benchmarks import flops, measure, memory_plan, report
from mlseg_jax import errors
from mlseg_jax import sharding as sharding_lib
# mlseg_jax.main defines --config (a locked config file with --config.* overrides): this
# command reads the same flag.
from mlseg_jax.main import validate_config
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import resolve_attention_impl


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
  matmul_size: int = 0  # 0: measure.PEAK_SIZES of the platform.
  copy_mib: int = 0
  profile: str = ""  # A directory: trace measure.PROFILE_STEPS training steps into it.


# ---------------------------------------------------------------------------------------
# The whole run.


def _derive(res: dict, analytic: int, peak_tflops: float, n_dev: int, batch: int):
  """Adds per-device rates and both MFUs to a phase's results."""
  t = res["timing"]["median_s"]
  res["analytic_flops"] = analytic
  res["images_per_s"] = batch / t
  res["images_per_s_per_device"] = batch / t / n_dev
  res["tflops_model"] = flops.achieved_tflops(analytic, t, n_dev)
  res["mfu_model"] = flops.mfu(analytic, t, peak_tflops, n_dev)
  if res.get("xla_flops"):
    # XLA analyses the partitioned program: its count is already per device.
    res["tflops_xla"] = flops.achieved_tflops(res["xla_flops"], t, 1)
    res["mfu_xla"] = flops.mfu(res["xla_flops"], t, peak_tflops, 1)


def _load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def run(config, opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every measurement of the module docstring; returns the results as a dict."""
  # 1. The peer, before JAX starts its backend (on GPUs that reserves most of the memory).
  torch_res = {"skipped": "--notorch"}
  if opts.torch:
    log("torch peer: timm ViT forward + backward ...")
    torch_res = measure.run_torch_peer(config, opts.batch, opts.steps, opts.warmup,
                                       opts.torch_compile, opts.torch_threads)

  devices = jax.devices()
  if opts.devices:
    if opts.devices > len(devices):
      raise ValueError(f"--devices={opts.devices} but only {len(devices)} are present")
    devices = devices[:opts.devices]
  n_dev = len(devices)
  dev0 = devices[0]
  m = config.model
  width, depth, heads, patch = flops.backbone_dims(m)
  results: dict[str, Any] = {
      "device": {"platform": dev0.platform, "kind": dev0.device_kind, "count": n_dev,
                 "processes": jax.process_count()},
      # CPU timings depend on what else runs on the machine.
      "host": {"cpus": os.cpu_count(), "load_average": _load_average()},  # 1, 5, 15 min
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "python": platform.python_version()},
      "config": {"backbone": m.backbone, "width": width, "depth": depth, "heads": heads,
                 "patch": patch, "crop": list(config.data.crop_size),
                 "decoder": m.decoder, "num_classes": m.num_classes, "dtype": m.dtype,
                 "attention_impl": resolve_attention_impl(m.attention_impl, m.dtype),
                 "remat": bool(m.remat),
                 "remat_policy": m.remat_policy if m.remat else None,
                 "topk": m.topk if decoder_spec(m).selects_topk else None},
      "options": dataclasses.asdict(opts),
      "torch": torch_res,
  }
  if dev0.platform != "cpu" and m.dtype == "float32":
    log("note: model.dtype is float32; --config.model.dtype=bfloat16 computes in bf16 "
        "(parameters stay float32)")

  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  dp = sharding_lib.data_parallel_size(mesh)
  validate_config(measure.with_batch(config, opts.batch), num_devices=n_dev)
  if (opts.eval_batch or opts.batch) % dp:
    raise ValueError(f"--eval_batch={opts.eval_batch or opts.batch} is not divisible by the "
                     f"data-parallel size {dp}")

  # 2. The largest batch.
  batch = opts.batch
  if opts.sweep_batch:
    log(f"sweep: doubling the batch from {batch} until device memory runs out ...")
    largest, tried = measure.largest_fitting_batch(
        lambda b: measure.probe_batch(config, b, mesh), batch, opts.sweep_max,
        granularity=dp)
    results["sweep"] = {"tried": {str(b): ok for b, ok in sorted(tried.items())},
                        "largest": largest, "limit": opts.sweep_max}
    log("sweep: " + ", ".join(f"{b}:{'fits' if ok else 'OOM'}" for b, ok in
                              sorted(tried.items())) + f" -> {largest}")
    if largest is None:
      raise RuntimeError(f"batch {batch} does not fit in device memory")
    batch = largest
  validate_config(measure.with_batch(config, batch), num_devices=n_dev)

  # 3. The training step.
  log(f"train: compiling the step at batch {batch} on {n_dev} {dev0.device_kind} ...")
  train_res, (model, params) = measure.bench_train(config, batch, mesh, opts.steps,
                                                   opts.warmup, opts.profile)
  results["train"] = train_res
  log(f"train: compiled in {train_res['compile_s']:.1f} s; XLA flops "
      f"{report.fmt_num(train_res['xla_flops'])}, memory "
      f"{report.fmt_memory(train_res['memory'])}")

  # 4. Our backbone alone, the peer's workload.
  if "timing" in results["torch"]:
    log("backbone: our ViT forward + backward ...")
    results["backbone"] = measure.bench_backbone(model, params, config, opts.batch, mesh,
                                                 opts.steps, opts.warmup)

  # 5. Evaluation.
  eval_batch = opts.eval_batch or batch
  log(f"eval: single-scale forward over {eval_batch} windows ...")
  results["eval"] = measure.bench_eval_forward(model, params, config, eval_batch, mesh,
                                               opts.steps, opts.warmup)
  if opts.eval_images:
    log(f"eval: sliding window over {opts.eval_images} synthetic images ...")
    results["eval_sliding"] = measure.bench_sliding_window(model, params, config, eval_batch,
                                                           opts.eval_images)
  del params
  gc.collect()

  # 6. The peak, last (its buffers would count in the phases' peak memory).
  sizes = measure.PEAK_SIZES.get(dev0.platform, measure.PEAK_SIZES["gpu"])
  n = opts.matmul_size or sizes["matmul"]
  log(f"peak: {n}^3 matmul and a {opts.copy_mib or sizes['copy_mib']} MiB copy ...")
  peak = {"matmul_bfloat16": measure.measure_matmul_peak(n, "bfloat16", dev0)}
  if m.dtype != "bfloat16":
    peak[f"matmul_{m.dtype}"] = measure.measure_matmul_peak(n, m.dtype, dev0)
  peak["compute_dtype"] = m.dtype
  peak["tflops"] = peak[f"matmul_{m.dtype}"]["tflops"]
  peak["copy"] = measure.measure_copy_bandwidth(opts.copy_mib or sizes["copy_mib"], dev0)
  results["peak"] = peak

  _derive(results["train"], flops.model_flops(config, batch, train=True), peak["tflops"],
          n_dev, batch)
  _derive(results["eval"], flops.model_flops(config, eval_batch, train=False),
          peak["tflops"], n_dev, eval_batch)
  results["flop_breakdown"] = {
      "train_forward_per_image": flops.flop_breakdown(config, train=True),
      "eval_forward_per_image": flops.flop_breakdown(config, train=False)}
  if "backbone" in results:
    bb = results["backbone"]
    _derive(bb, flops.backbone_flops(config, opts.batch), peak["tflops"], n_dev, opts.batch)
    torch_t = results["torch"]["timing"]["median_s"]
    results["torch"]["ours_over_torch_backbone"] = bb["timing"]["median_s"] / torch_t
    if batch == opts.batch:
      results["torch"]["ours_step_over_torch_backbone"] = (
          results["train"]["timing"]["median_s"] / torch_t)
  results["host"]["load_average_end"] = _load_average()
  return results


# ---------------------------------------------------------------------------------------
# Command line.

_DEFAULTS = Options()
flags.DEFINE_integer("batch", _DEFAULTS.batch, "Global training batch.")
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Timed steps per phase.")
flags.DEFINE_integer("warmup", _DEFAULTS.warmup, "Untimed steps first.")
flags.DEFINE_integer("eval_batch", _DEFAULTS.eval_batch,
                     "Windows per evaluation call (0: the batch).")
flags.DEFINE_integer("eval_images", _DEFAULTS.eval_images,
                     "Synthetic images for the sliding-window evaluation (0: skip it).")
flags.DEFINE_boolean("torch", _DEFAULTS.torch,
                     "Time the timm/PyTorch peer (--notorch skips it).")
flags.DEFINE_enum("torch_compile", _DEFAULTS.torch_compile, ["auto", "on", "off"],
                  "torch.compile the peer (auto: on CUDA only).")
flags.DEFINE_integer("torch_threads", _DEFAULTS.torch_threads,
                     "The peer's CPU threads (0: torch's default; 1 on a busy shared CPU).")
flags.DEFINE_boolean("sweep_batch", _DEFAULTS.sweep_batch,
                     "Find the largest batch that fits (doubling from --batch) and "
                     "benchmark it.")
flags.DEFINE_integer("sweep_max", _DEFAULTS.sweep_max, "Largest batch the sweep tries.")
flags.DEFINE_integer("devices", _DEFAULTS.devices, "Use the first N devices (0: all).")
flags.DEFINE_integer("matmul_size", _DEFAULTS.matmul_size,
                     "n of the n^3 peak matmul (0: by platform).")
flags.DEFINE_integer("copy_mib", _DEFAULTS.copy_mib,
                     "MiB of the bandwidth copy (0: by platform).")
flags.DEFINE_string("profile", _DEFAULTS.profile,
                    "Trace a few training steps into this directory (TensorBoard / "
                    "Perfetto) and print the busiest operations.")
_JSON = flags.DEFINE_string("json", "", "Write every number to this JSON file.")
_PLAN = flags.DEFINE_boolean(
    "plan", False, "Only the memory plan at --batch: parameters, optimizer state and "
    "the activations each remat policy keeps, traced on the host (no device work).")


def normalise_argv(argv: list[str], bool_flags=("torch", "sweep_batch", "plan")) -> list[str]:
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


def _main(args):
  if len(args) > 1:
    raise errors.UsageError(f"unexpected arguments: {args[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise errors.UsageError("--config is required")
  opts = Options(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Options)})
  for name in ("batch", "steps"):
    if getattr(opts, name) < 1:
      raise errors.UsageError(f"--{name}={getattr(opts, name)} must be at least 1")
  if _PLAN.value:
    results = {"plan": memory_plan.plan(config, opts.batch)}
    print(report.format_plan(results["plan"], config), flush=True)
  else:
    results = run(config, opts, log=lambda s: print(s, file=sys.stderr, flush=True))
  results.setdefault("config", {})
  results["config"]["file"] = config_flags.get_config_filename(flags.FLAGS["config"])
  results["config"]["overrides"] = config_flags.get_override_values(flags.FLAGS["config"])
  if not _PLAN.value:
    print(report.format_table(results), flush=True)
  if _JSON.value:
    path = Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=report.json_default))
    print(f"wrote {path}", flush=True)


def main(argv=None):
  errors.run(_main, argv=normalise_argv(list(sys.argv if argv is None else argv)))


if __name__ == "__main__":
  main()
