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
from the answer of the most similar row already searched (on this slice, else scaled by
the chips' HBM from another): a close start costs two compiles, a far one a few more,
never a different answer. Each JSON records the commit it was compiled at. Results
already on disk are kept, so an interrupted run resumes where it stopped; `--render`
rewrites the table between the markers in `benchmarks/README.md` from whatever is there,
rows not yet compiled marked pending.
"""

from __future__ import annotations

import argparse
import json
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


def _words(row: str) -> set[str]:
  """A row's name as words, its dataset one word: COCO-Stuff is not half COCO+LVIS."""
  m = re.fullmatch(r"(.*)_(\d+k)_(.*)", row)
  return set(m.group(1).split("_")) | {m.group(2), m.group(3)} if m else set(row.split("_"))


def max_batch_hint(row: str, topology: str) -> int | None:
  """Where to start `row`'s search: the answer of the searched row sharing the most of its
  name (method, backbone, crop, schedule, dataset; this slice breaks ties), the answer
  scaled by the chips' HBM where it is another slice's. Siblings differ more than slices
  do: MLSeg's B/16 ADE20K row takes 26 per chip on v5e-8 and Segmenter's 45."""
  from mlseg_jax import aot

  words, hbm = _words(row), aot.parse_slice(topology).chip.hbm_gib
  best = None
  for path in sorted(OUT.glob("*/*.max_batch.json")):
    other, slice_name = path.name[:-len(".max_batch.json")], path.parent.name
    found = json.loads(path.read_text())
    if (other, slice_name) == (row, topology) or not found.get("max_batch_per_chip"):
      continue
    score = (len(words & _words(other)), slice_name == topology,
             -abs(found["chip"]["hbm_gib"] - hbm))
    if best is None or score > best[0]:
      best = score, found
  if best is None:
    return None
  found = best[1]
  return max(1, int(found["max_batch_per_chip"] * hbm / found["chip"]["hbm_gib"]))


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
