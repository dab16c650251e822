r"""Our training step beside the reference's, on this machine's CPU (never in CI).

  python -m benchmarks.step_vs_reference --reference ../RankSeg/mmseg \
      --reference-python ../refvenv/bin/python                       # ViT-B/16 MLSeg 512

One persistent process each: ours here, the reference's (`benchmarks/reference_step.py`,
under an interpreter with torch and mmcv 1.4.0) beside it, built once and then alternated
step by step over --rounds, so that a machine whose speed drifts (a shared VM's does, by
20% over minutes) slows both alike. Same images and labels (one synthetic batch, written
for both), batch --batch, float32, random weights (weights do not change the speed), the
reference's optimizer and ours each as the config says; each side has the machine's
cores to itself while it steps (torch gets --threads). The ratio is the reference's
median step over ours: above 1.0, ours is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROWS = {  # our config: the reference's
    "segmenter_mlseg_vit_b16_512_160k_ade20k":
        "configs/segmenter/segmenter-ori_rankseg_vit-b16_512x512_160k_ade20k.py",
    "segmenter_vit_b16_512_160k_ade20k":
        "configs/segmenter/segmenter-ori_vit-b16_512x512_160k_ade20k.py",
}


class Reference:
  """The reference's step in its own process, driven over stdin."""

  def __init__(self, python: str, root: str, config: str, data: str, threads: int):
    cmd = [python, str(REPO / "benchmarks" / "reference_step.py"), root,
           os.path.join(root, config), data, str(threads)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    for line in self.proc.stdout:
      if line.strip() == "READY":
        return
    raise RuntimeError(f"the reference's process ended before it was ready: {cmd}")

  def steps(self, n: int) -> list[float]:
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def ours(config, batch: int, data: dict):
  """(step(), loss of the first step): our jitted step of `config`, compiled, run once."""
  import jax

  from mlseg_jax import train

  config.train.batch_size = batch
  config.model.dtype = "float32"
  _, mesh, state, _, step_fn = train.setup(config)
  inputs = train.global_batch(data, mesh)
  compiled = step_fn.lower(state, inputs).compile()
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], inputs)
    jax.block_until_ready(metrics)
    return metrics

  return step, float(step()["loss"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", default="segmenter_mlseg_vit_b16_512_160k_ade20k",
                      choices=sorted(ROWS))
  parser.add_argument("--reference", required=True,
                      help="RankSeg's mmseg folder (the one holding mmseg/ and configs/)")
  parser.add_argument("--reference-python", required=True,
                      help="an interpreter with torch, timm and mmcv 1.4.0")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)

  from benchmarks import measure
  from benchmarks.eval_throughput import load_config
  from mlseg_jax.configs import resolve

  config = load_config(resolve(args.row))
  data = measure.synthetic_batch(config, args.batch)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "batch.npz")
    np.savez(path, **data)
    reference = Reference(args.reference_python, args.reference, ROWS[args.row], path,
                          args.threads)
    try:
      reference.steps(args.warmup)
      step, loss = ours(config, args.batch, data)
      for _ in range(args.warmup - 1):
        step()
      times = {"ours": [], "reference": []}
      for _ in range(args.rounds):
        time.sleep(1)  # torch's OpenMP threads spin a while after a step.
        start = time.perf_counter()
        step()
        times["ours"].append(time.perf_counter() - start)
        time.sleep(1)
        times["reference"] += reference.steps(1)
    finally:
      reference.close()
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {"row": args.row, "batch": args.batch, "threads": args.threads,
            "rounds": args.rounds, "seconds": times, "median_s": med,
            "ratio": med["reference"] / med["ours"], "our_first_loss": loss}
  print(f"| {args.row}, batch {args.batch}, fp32 | ours {med['ours']:.2f} s | reference "
        f"{med['reference']:.2f} s | ratio {result['ratio']:.2f}x |")
  print("ours:", [round(t, 2) for t in times["ours"]])
  print("reference:", [round(t, 2) for t in times["reference"]])
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
