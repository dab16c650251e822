r"""The PyTorch peer: timm's ViT of the config's backbone size, forward + backward.

  python -m benchmarks.torch_peer '{"width": 768, "depth": 12, ...}'   (torch_peer's kwargs)

Runs in its own process, started by the benchmark before JAX takes the accelerator: its
own CUDA libraries and memory. Prints one line, `TORCH_PEER {json}`. Imports neither JAX
nor the package.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer


def torch_peer(width: int, depth: int, heads: int, patch: int, image_size, batch: int,
               steps: int, warmup: int, bf16: bool, drop_path_rate: float = 0.0,
               compile_mode: str = "auto", threads: int = 0) -> dict[str, Any]:
  """timm ViT forward + backward at `batch` x `image_size`; `seconds` of each timed step.

  threads: torch's intra-op CPU threads (0: torch's default). On a CPU shared with other
  work, OpenMP threads spinning at barriers can make a step 100x slower; 1 avoids that.
  """
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
         "cpu_threads": torch.get_num_threads(), "seconds": seconds, "notes": notes}
  if cuda:
    res["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  return res


if __name__ == "__main__":
  print("TORCH_PEER " + json.dumps(torch_peer(**json.loads(sys.argv[1]))), flush=True)
