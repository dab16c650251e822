r"""Every paper row compiled for TPU slices (`python -m mlseg_jax.aot`), as one table.

  python -m benchmarks.tpu_table --topologies v5e-8,v4-8          # compile what is missing
  python -m benchmarks.tpu_table --render                          # the table into README

Each (row, slice) is one `mlseg_jax.aot` process at the reference's batch of 8 in bfloat16
(the training step and the config's own evaluation forwards for ADE20K-sized images),
written to `benchmarks/tpu/<slice>/<row>.json`; a row whose step does not fit is compiled
again with `model.remat=True`, and the table says which setting it needs. `--max_batch`
adds the largest batch per chip (`<row>.max_batch.json`): in the same process as the row's
first compile when the row is new, so the step at batch 8 is compiled once, and then the
table takes the step's numbers from the search (compiled at its commit). The search starts
from what the rows already searched predict (`max_batch_hint`): a close start costs two
compiles, a far one a few more, never a different answer. Each JSON records the commit it
was compiled at. Results already on disk are kept, so an interrupted run resumes where it
stopped; `--render` rewrites the table between the markers in `benchmarks/README.md` from
whatever is there, rows not yet compiled marked pending.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "tpu"
README = REPO / "benchmarks" / "README.md"
BEGIN, END = "<!-- tpu-table begin -->", "<!-- tpu-table end -->"
# The rows the paper's claims rest on first, so a partial run has them.
FIRST = ("segmenter_mlseg_vit_b16_512_160k_ade20k", "segmenter_mlseg_vit_l16_640_160k_ade20k",
         "segmenter_vit_b16_512_160k_ade20k", "segmenter_vit_l16_640_160k_ade20k")


def rows() -> list[str]:
  names = sorted(p.stem for p in (REPO / "configs").glob("segmenter_*.py"))
  return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _commit() -> str:
  def git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
  return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                   "mlseg_jax", "configs") else "")


def _aot(row: str, topology: str, out: pathlib.Path, *extra: str) -> dict | None:
  cmd = [sys.executable, "-m", "mlseg_jax.aot", "--config", f"configs/{row}.py",
         "--topology", topology, "--json", str(out), "--config.model.dtype=bfloat16", *extra]
  print("+", " ".join(cmd[1:]), flush=True)
  # stdout as it comes (a search says each compile); stderr, noisy, only on failure.
  proc = subprocess.run(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    print(proc.stderr[-2000:], flush=True)
  if proc.returncode or not out.exists():
    return None
  report = dict(json.loads(out.read_text()), commit=_commit())
  out.write_text(json.dumps(report, indent=1, default=str))
  return report


def _step(report: dict) -> dict | None:
  """The training step at the config's batch, where the report compiled one (a search
  alone, `--notrain`, compiled only other batches)."""
  if "train_batch" not in report:
    return None
  name = f"train step, batch {report['train_batch']} ("
  return next((p for p in report["programs"] if p["name"].startswith(name)), None)


_ROW = re.compile(r"(.*)_vit_([a-z]\d+)_(\d+)_\d+k_(.*)")


def _model(row: str) -> tuple[str, ...]:
  """(method, backbone, crop, dataset) of a row: what its training step is made of (the
  schedule's length is not)."""
  m = _ROW.fullmatch(row)
  return m.groups() if m else (row, "", "", "")


def _searched(row: str, topology: str) -> dict[tuple[str, ...], float]:
  """{model: largest batch per chip} of the rows searched so far, as on `topology`: this
  slice's answer where it has one, else the one of the slice nearest in HBM, scaled by
  how the two slices' answers compare (`_slice_ratio`)."""
  from mlseg_jax import aot

  hbm = aot.parse_slice(topology).chip.hbm_gib
  answers: dict[str, dict[tuple[str, ...], int]] = {}
  hbms: dict[str, float] = {}
  for path in sorted(OUT.glob("*/*.max_batch.json")):
    other, slice_name = path.name[:-len(".max_batch.json")], path.parent.name
    report = json.loads(path.read_text())
    if (other, slice_name) == (row, topology) or not report.get("max_batch_per_chip"):
      continue
    answers.setdefault(slice_name, {})[_model(other)] = report["max_batch_per_chip"]
    hbms[slice_name] = report["chip"]["hbm_gib"]
  here = answers.pop(topology, {})
  found: dict[tuple[str, ...], float] = dict(here)
  for slice_name in sorted(answers, key=lambda s: (abs(hbms[s] - hbm), s)):
    there = answers[slice_name]
    for model, value in there.items():
      if model not in found:
        found[model] = value * _slice_ratio(model, there, here, hbm / hbms[slice_name])
  return found


def _slice_ratio(model: tuple[str, ...], there: dict, here: dict, by_hbm: float) -> float:
  """How this slice's answers compare with another's: the mean ratio of the models
  searched on both that share the most parts with `model`, else their HBM's. HBM alone
  misleads: MLSeg ViT-B/16 512 takes 53 per chip on v4-8 (32 GiB) and 26 on v5e-8 (16),
  its ViT-L/16 640 34 and 9."""
  ratio = _most_alike([(sum(a == b for a, b in zip(m, model)), here[m] / there[m])
                       for m in here if m in there])
  return by_hbm if ratio is None else ratio


def _ratio(known: dict, i: int, old: str, new: str, like: tuple) -> float | None:
  """How the answer changes when part `i` of a model goes from `old` to `new`, from two
  searched models that differ in that part alone (the pair most like `like`)."""
  pairs = []
  for x, value in known.items():
    y = x[:i] + (new,) + x[i + 1:]
    if x[i] == old and y in known:
      pairs.append((sum(a == b for a, b in zip(x, like)), known[y] / value))
  return _most_alike(pairs)


def _most_alike(pairs: list[tuple[int, float]]) -> float | None:
  """The mean of the ratios whose models share the most parts with the one asked about:
  (parts shared, ratio) pairs; None where there are none."""
  if not pairs:
    return None
  most = max(shared for shared, _ in pairs)
  ratios = [r for shared, r in pairs if shared == most]
  return sum(ratios) / len(ratios)


@functools.cache
def _classes(dataset: str) -> int:
  row = next(r for r in rows() if _model(r)[3] == dataset)
  return importlib.import_module(f"mlseg_jax.configs.{row}").get_config().model.num_classes


def _distance(i: int, old: str, new: str) -> float:
  """How far apart two values of part `i` of a model are, where no searched pair tells
  how the answer changes between them: crops and class counts by their log ratio,
  methods by the words they do not share."""
  if i == 0:
    a, b = set(old.split("_")), set(new.split("_"))
    return 1 - len(a & b) / len(a | b)
  if i == 2:
    return abs(math.log(int(old) / int(new)))
  if i == 3:
    return abs(math.log(_classes(old) / _classes(new)))
  return 1.0


def max_batch_hint(row: str, topology: str) -> int | None:
  """Where to start `row`'s search: a searched model's answer, corrected for each part
  (method, backbone, crop, dataset) in which it differs from `row`'s by the ratio two
  searched models differing in that part alone show (a crop no pair covers, by its
  pixels). The models with the fewest uncorrected parts, the nearest in those, then the
  nearest in the corrected ones, are averaged. Parts matter unequally, so words shared
  do not do: on v5e-8, B/16 ADE20K takes 45 per chip for Segmenter and 26 for MLSeg,
  MLSeg-GT 45 on ADE20K and 13 on ADE20K-Full."""
  known = _searched(row, topology)
  target = _model(row)
  scored = []
  for model, value in known.items():
    uncorrected, far, near = 0, 0.0, 0.0
    for i, (old, new) in enumerate(zip(model, target)):
      if old != new:
        ratio = _ratio(known, i, old, new, target)
        if ratio is None:
          uncorrected, far = uncorrected + 1, far + _distance(i, old, new)
          if i == 2:  # activations grow with the pixels of the crop
            value *= (int(old) / int(new)) ** 2
        else:
          # A ratio carried from other models holds less the further it reaches: MLSeg-GT
          # takes 45 per chip on ADE20K and 13 on ADE20K-Full, MLSeg 26 and 22.
          value, near = value * ratio, near + _distance(i, old, new)
    scored.append(((uncorrected, round(far, 6), round(near, 6)), value))
  if not scored:
    return None
  best = min(score for score, _ in scored)
  values = [v for score, v in scored if score == best]
  return max(1, round(sum(values) / len(values)))


def _search(row: str, topology: str) -> tuple[str, ...]:
  """The flags of a max-batch search, from what is searched so far."""
  hint = max_batch_hint(row, topology)
  return ("--max_batch",) + ((f"--max_batch_hint={hint}",) if hint else ())


def compile_row(row: str, topology: str, max_batch: bool) -> None:
  folder = OUT / topology
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{row}.json"
  best = folder / f"{row}.max_batch.json"
  if not path.exists():
    search = _search(row, topology) if max_batch else ()
    report = _aot(row, topology, path.with_suffix(".tmp"), *search)
    if report is not None and not _step(report)["fits"]:
      report = _aot(row, topology, path.with_suffix(".tmp"), "--config.model.remat=True",
                    *search)
    if report is None:
      return
    if max_batch:
      best.write_text(path.with_suffix(".tmp").read_text())
    path.with_suffix(".tmp").rename(path)
  report = json.loads(path.read_text())
  if max_batch and not best.exists():
    tmp = best.with_suffix(".tmp")
    # The step at batch 8 is in the row's report already.
    if _aot(row, topology, tmp, "--noeval", "--notrain", *_search(row, topology),
            f"--config.model.remat={report['remat']}") is not None:
      tmp.rename(best)


def _cells(row: str, topology: str) -> list[str]:
  path = OUT / topology / f"{row}.json"
  if not path.exists():
    return [row, topology] + ["pending"] + [""] * 8
  r = json.loads(path.read_text())
  hbm = r["chip"]["hbm_gib"]
  best_path = OUT / topology / f"{row}.max_batch.json"
  searched = json.loads(best_path.read_text()) if best_path.exists() else None
  best = str(searched.get("max_batch_per_chip", "-")) if searched else "pending"
  step = (searched and _step(searched)) or _step(r)
  gib = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
  fits = (f"yes ({gib(step['total'])} of {hbm:g} GiB)" if step["fits"]
          else f"no ({gib(step['total'])} of {hbm:g} GiB)")
  ev = r.get("eval", {})
  return [row, topology, "on" if r["remat"] else "off", fits, best,
          f"{step['flops'] / 1e9:.0f}" if step["fits"] else "-",
          gib(step["temporaries"]) if step["fits"] else "-",
          f"{step['mfu_bound']:.0%}" if step["fits"] else "-",
          f"{step['compile_s']:.0f}",
          f"{ev.get('programs', '-')} / {ev.get('compile_s', 0):.0f}" if ev else "-"]


def render(topologies: list[str]) -> str:
  head = ["row", "slice", "remat", "batch 8 fits (HBM per chip)", "max batch per chip",
          "GFLOP per chip", "temp GiB", "MFU bound", "step compile s",
          "eval programs / compile s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in topologies:
    for row in rows():
      lines.append("| " + " | ".join(_cells(row, t)) + " |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--topologies", default="v5e-8,v4-8")
  ap.add_argument("--rows", default="", help="comma-separated config names (default: all)")
  ap.add_argument("--max_batch", action="store_true")
  ap.add_argument("--render", action="store_true")
  args = ap.parse_args()
  topologies = args.topologies.split(",")
  if args.render:
    text = README.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    README.write_text(head + BEGIN + "\n" + render(topologies) + "\n" + END + tail)
    return
  for t in topologies:
    for row in (args.rows.split(",") if args.rows else rows()):
      compile_row(row, t, args.max_batch)


if __name__ == "__main__":
  main()
