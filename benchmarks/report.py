"""The benchmark's text output: the results table, the memory plan, and JSON encoding."""

from __future__ import annotations

import numpy as np

from benchmarks.flops import backbone_dims
from mlseg_jax.models.segmenter import resolve_attention_impl


def fmt_num(x) -> str:
  if x is None:
    return "n/a"
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def fmt_bytes(x) -> str:
  if x is None:
    return "n/a"
  return f"{x / 2 ** 30:.2f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def fmt_memory(mem) -> str:
  if not mem:
    return "n/a"
  return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items())


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(results: dict) -> str:
  """The results of `bench.run` as a table of the phases and a line per extra."""
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
    mem_txt = (fmt_bytes(mem) + " peak" if mem else
               (fmt_bytes(r["memory"]["total"]) + " xla" if r.get("memory") else "n/a"))
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
  lines.append(f"train: XLA {fmt_num(t.get('xla_flops'))} FLOPs/step/device, model "
               f"{fmt_num(t['analytic_flops'])} FLOPs/step; loop (no per-step sync) "
               f"{1e3 * t['loop_step_s']:.2f} ms/step; compile {t['compile_s']:.1f} s; "
               f"memory analysis: {fmt_memory(t['memory'])}")
  e = results["eval"]
  lines.append(f"eval forward: XLA {fmt_num(e.get('xla_flops'))} FLOPs, model "
               f"{fmt_num(e['analytic_flops'])} FLOPs; memory analysis: "
               f"{fmt_memory(e['memory'])}")
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


def format_plan(plan: dict, config) -> str:
  """`memory_plan.plan`'s result as a few lines and a table, one row per remat policy."""
  m = config.model
  width, depth, heads, patch = backbone_dims(m)
  state = plan["params_bytes"] * 2 + plan["opt_state_bytes"]  # + the gradients
  lines = [
      f"memory plan: ViT {m.backbone} (width {width}, depth {depth}), {m.decoder}, crop "
      f"{tuple(config.data.crop_size)}, batch {plan['batch']}, {m.dtype}, attention "
      f"{resolve_attention_impl(m.attention_impl, m.dtype)}, optimizer {config.optim.name}",
      f"  parameters {fmt_bytes(plan['params_bytes'])}, gradients "
      f"{fmt_bytes(plan['params_bytes'])}, optimizer state "
      f"{fmt_bytes(plan['opt_state_bytes'])}: {fmt_bytes(state)}",
      "  | remat policy | saved activations | + parameters, gradients, optimizer state |",
      "  |---|---|---|",
  ]
  for name, act in plan["activations_bytes"].items():
    lines.append(f"  | {name} | {fmt_bytes(act)} | {fmt_bytes(act + state)} |")
  return "\n".join(lines)


def json_default(x):
  """What json.dumps cannot encode itself: numpy scalars, tuples, anything else as text."""
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, tuple):
    return list(x)
  return str(x)
