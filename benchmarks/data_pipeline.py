r"""Training-pipeline throughput: images/s of 512x512 crops for 0, 1 and 2 worker processes.

  python benchmarks/data_pipeline.py [--root ../shared/data/camvid] [--batches 12]

Reads CamVid (the full set beside the repo if there, else the bundled subset) through
`make_train_iterator` with the reference's augmentation (Resize 2048x512 ratio 0.5-2,
RandomCrop 512 with cat_max_ratio, flip, PhotoMetricDistortion, Normalize, Pad).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from mlseg_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def images_per_second(config, batch_size: int, batches: int) -> float:
  it = data.make_train_iterator(config, batch_size, seed=0, process_index=0, process_count=1)
  try:
    next(it)  # Start-up (worker processes, first reads) is not throughput.
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    if hasattr(it, "close"):
      it.close()


def main():
  repo = pathlib.Path(__file__).parents[1]
  full = repo.parent / "shared" / "data" / "camvid"
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default=str(full if full.is_dir() else
                                            repo / "data" / "camvid_subset"))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--read_threads", type=int, default=2)
  args = parser.parse_args()

  print(f"CamVid at {args.root}, batch {args.batch_size}, {args.batches} batches timed, "
        f"{args.read_threads} reading threads per process")
  print(f"{'workers':>8} | {'images/s':>9}")
  print(f"{'-' * 8}-+-{'-' * 9}")
  for workers in (0, 1, 2):
    config = data.default_config()
    config.name, config.root = "camvid", args.root
    config.num_workers, config.read_threads = workers, args.read_threads
    rate = images_per_second(config, args.batch_size, args.batches)
    print(f"{workers:>8} | {rate:>9.1f}", flush=True)


if __name__ == "__main__":
  main()
