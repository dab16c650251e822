r"""Checks a dataset before a run: `python -m mlseg_jax.data.check --config configs/NAME.py`.

Reads every record of the config's train and val splits (`--split` for one) the way
training and evaluation do: the image decodes, its label map is there and decodes, both
have the same size, and every label value means a class or the ignore value under the
dataset's conventions. It prints, for each split, the number of records and of bad ones,
every bad file with what is wrong with it (one line each), and the class histogram: the
pixels and the images of each class among the records that read. `--config.data.root=DIR`
(or any data field) points it elsewhere, as for training.

Exit code: 0 when every file is good, 1 when some are bad, 2 for a command line or config
that does not work (a missing folder, an unknown dataset).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from typing import Callable, Iterable, Iterator, Sequence

from absl import flags
import ml_collections
import numpy as np

from mlseg_jax import errors
from mlseg_jax.data import datasets

SPLITS = ("train", "val")


@dataclasses.dataclass
class SplitReport:
  """What one split holds: its bad files and the classes of the records that read."""
  dataset: str
  split: str
  root: str
  class_names: Sequence[str]
  records: int = 0  # Records found, bad ones and files without their partner included.
  bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, line)
  pixels: np.ndarray | None = None  # (num_classes + 1,) int64; [0]: ignored pixels.
  images: np.ndarray | None = None  # (num_classes + 1,) int64: images holding each.

  @property
  def good(self) -> int:
    return self.records - len(self.bad)


def _files(ds: datasets.Dataset, index: int) -> tuple[str, ...]:
  if isinstance(ds, datasets.FileDataset):
    return ds.pairs[index][:2]
  return (f"{ds.split}[{index}]",)


def _read(ds: datasets.Dataset, num_classes: int, index: int):
  """(index, None, per-class pixel counts) or (index, the line saying why, None)."""
  try:
    label = ds[index]["label"]
  except datasets.RECORD_ERRORS as e:
    line = " ".join(str(e).split())  # One line, whatever the decoder's message held.
    files = _files(ds, index)
    if not any(f in line for f in files):
      line = f"{files[0]}: {line}"
    return index, line, None
  return index, None, np.bincount(label.ravel() + 1, minlength=num_classes + 1)


def _unordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
  """fn(item) for every item on `threads` threads, as each finishes; at most a few per
  thread in flight, so a split of any size holds only their results."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = set()
    for item in items:
      if len(pending) >= 4 * threads:
        done, pending = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED)
        yield from (f.result() for f in done)
      pending.add(pool.submit(fn, item))
    yield from (f.result() for f in concurrent.futures.as_completed(pending))


def check_split(config: ml_collections.ConfigDict, split: str, threads: int = 8,
                dataset: datasets.Dataset | None = None) -> SplitReport:
  """Reads every record of `split` of the data config `config` on `threads` threads (the
  decoders release the GIL); a progress bar when stderr is a terminal."""
  ds = dataset or datasets.get_dataset(config, split, skip_unpaired=True)
  n = ds.num_classes
  report = SplitReport(config.name, ds.split, str(config.root), ds.class_names,
                       records=len(ds) + len(ds.unpaired), bad=list(ds.unpaired),
                       pixels=np.zeros(n + 1, np.int64), images=np.zeros(n + 1, np.int64))
  bar = None
  if sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm(total=len(ds), desc=f"{config.name} {ds.split}", unit="image",
               dynamic_ncols=True)
  try:
    for index, line, counts in _unordered_map(lambda i: _read(ds, n, i), range(len(ds)),
                                              max(1, threads)):
      if line is None:
        report.pixels += counts
        report.images += counts > 0
      else:
        report.bad.append((_files(ds, index)[0], line))
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  report.bad.sort()
  return report


def format_report(report: SplitReport) -> str:
  """The summary, the bad files one per line, then the class histogram."""
  lines = [f"{report.dataset} {report.split} ({report.root}): {report.records} records, "
           f"{len(report.bad)} bad"]
  lines += [f"  bad: {line}" for _, line in report.bad]
  total = max(int(report.pixels.sum()), 1)
  width = min(max([len(c) for c in report.class_names] + [len("ignored")]), 32)
  lines.append(f"classes over the {report.good} records that read (pixels, share of all "
               "pixels, images holding the class):")
  rows = [(str(i), name, report.pixels[i + 1], report.images[i + 1])
          for i, name in enumerate(report.class_names)]
  rows.append(("-", "ignored", report.pixels[0], report.images[0]))
  for key, name, pixels, images in rows:
    lines.append(f"  {key:>4}  {name[:width]:<{width}}  {int(pixels):>14,}  "
                 f"{100 * pixels / total:6.2f}%  {int(images):>8,}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  if "data" not in config:
    raise errors.ConfigError(f"--config={flags.FLAGS['config'].config_filename} has no "
                             "data fields")
  from mlseg_jax.configs import validate  # pylint: disable=g-import-not-at-top

  validate.validate_data_config(config)
  splits = SPLITS if flags.FLAGS.split == "both" else (flags.FLAGS.split,)
  # Every split's files listed first: a wrong root or name fails before any long scan.
  found = [(s, datasets.get_dataset(config.data, s, skip_unpaired=True)) for s in splits]
  bad = 0
  for split, ds in found:
    report = check_split(config.data, split, flags.FLAGS.threads, dataset=ds)
    print(format_report(report), flush=True)
    bad += len(report.bad)
  if len(found) > 1:
    print(f"{bad} bad files in all" if bad else "every file is good")
  return 1 if bad else 0


def _define_flags() -> None:
  # Only when this module is the program: `config` is also the trainer's flag.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) whose data "
                                  "fields name the dataset.", lock_config=True)
  flags.DEFINE_enum("split", "both", ("train", "val", "both"), "The split(s) to check.")
  flags.DEFINE_integer("threads", 8, "Reading threads.", lower_bound=1)
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
