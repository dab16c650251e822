r"""Training-loop throughput with and without device prefetch.

  python benchmarks/train_loop.py [--host_ms 100] [--jitter_ms 80] [--steps 40] [--log_every 10]

Runs `mlseg_jax.train.train` on the quickstart model (batch 8, 128x128 crops) and times
the steady state: the interval between batches taken after `warmup` steps. The
batches come from a stand-in loader that takes `host_ms` +- `jitter_ms` (uniform) of
wall time per batch without holding the GIL -- what Grain's reading threads and worker
processes look like from the training loop -- so the loader and the step can overlap
even on a 2-core CPU. `train.log_every` sets how often the loop waits on the device
(metrics are fetched then); each wait is where read-ahead matters.
"""

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

import numpy as np  # noqa: E402


def slow_batches(host_ms: float, jitter_ms: float, batch: int, size: int, classes: int,
                 handed_out: list):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, classes, size=(batch, size, size)).astype(np.int32)
  while True:
    time.sleep(max(0.0, host_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000)
    handed_out.append(time.perf_counter())
    yield {"image": images, "label": labels}


def seconds_per_step(config, steps: int, warmup: int, args) -> float:
  """Steady-state seconds per step: the loop (or its prefetch thread) takes batches at the
  rate it trains them once the bounded queue is full, so the interval between the batches
  handed out after `warmup` (compilation) is the step time the loop sustains."""
  from mlseg_jax import train

  config.train.total_steps = warmup + steps + 4
  handed_out = []
  with tempfile.TemporaryDirectory() as workdir:
    train.train(config, workdir, data_iter=slow_batches(
        args.host_ms, args.jitter_ms, config.train.batch_size, config.data.crop_size[0],
        config.model.num_classes, handed_out))
  return (handed_out[warmup + steps] - handed_out[warmup]) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--host_ms", type=float, default=100.0)
  parser.add_argument("--jitter_ms", type=float, default=80.0)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=5)
  args = parser.parse_args()

  import jax
  from mlseg_jax.configs import quickstart

  print(f"quickstart model, batch 8, 128x128, on {jax.devices()[0].device_kind}; loader "
        f"{args.host_ms:.0f} +- {args.jitter_ms:.0f} ms per batch; log (device wait) every "
        f"{args.log_every} steps; {args.steps} steps timed")
  print(f"{'prefetch':>8} | {'ms/step':>8} | {'images/s':>8}")
  print(f"{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}")
  for prefetch in (0, 2):
    config = quickstart.get_config()
    config.train.prefetch = prefetch
    config.train.log_every = args.log_every
    config.train.checkpoint_every = 10 ** 6
    config.train.eval_every = 10 ** 6
    s = seconds_per_step(config, args.steps, args.warmup, args)
    print(f"{prefetch:>8} | {1000 * s:>8.1f} | {config.train.batch_size / s:>8.1f}",
          flush=True)


if __name__ == "__main__":
  main()
