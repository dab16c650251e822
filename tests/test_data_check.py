"""`python -m mlseg_jax.data.check`: every bad file named once, the class histogram, exit codes."""

import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from conftest import REPO, SHARED_DATA
from mlseg_jax import data
from mlseg_jax.data import check

CAMVID = SHARED_DATA / "camvid"


def copy_camvid(root, n, split="train"):
  """The first `n` images of the shared CamVid split and their labels under `root`;
  returns their stems."""
  stems = sorted(p.stem for p in (CAMVID / "images" / split).glob("*.jpg"))[:n]
  for kind, suffix in (("images", ".jpg"), ("labels", ".png")):
    (root / kind / split).mkdir(parents=True, exist_ok=True)
    for stem in stems:
      shutil.copy(CAMVID / kind / split / f"{stem}{suffix}", root / kind / split)
  return stems


def plant_bad_files(root, stems, split="train"):
  """Spoils three of the copied records and adds two bad ones; returns {file: what the
  checker must say about it}."""
  images, labels = root / "images" / split, root / "labels" / split
  truncated = images / f"{stems[0]}.jpg"
  truncated.write_bytes(truncated.read_bytes()[:20000])
  out_of_range = labels / f"{stems[1]}.png"
  values = np.array(PIL.Image.open(out_of_range))
  values[:4, :4] = 20  # CamVid stores 0..10 and 255.
  PIL.Image.fromarray(values).save(out_of_range)
  small = labels / f"{stems[2]}.png"
  PIL.Image.fromarray(np.array(PIL.Image.open(small))[:300, :400]).save(small)
  shutil.copy(CAMVID / "images" / split / f"{stems[3]}.jpg", images / "no_label.jpg")
  (images / "notes.jpg").write_text("camera settings: f/2.8\n")
  shutil.copy(labels / f"{stems[4]}.png", labels / "notes.png")
  return {
      str(truncated): r"cannot read the image \(image file is truncated",
      str(out_of_range): r"label values \[20\] are out of range",
      str(images / f"{stems[2]}.jpg"): rf"is 480x360 \(WxH\) but its label map {small} is 400x300",
      str(images / "no_label.jpg"): rf"no label map {labels / 'no_label.png'}$",
      str(images / "notes.jpg"): r"cannot read the image \(not a format PIL reads; the file starts "
                                 r"with b'camera settings",
  }


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp("clean")
  copy_camvid(root, 20)
  return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  root = tmp_path_factory.mktemp("planted")
  return root, plant_bad_files(root, copy_camvid(root, 20))


def _run(*args):
  return subprocess.run([sys.executable, "-m", "mlseg_jax.data.check",
                         "--config", "configs/quickstart.py", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_checker_names_exactly_the_planted_bad_files_and_exits_1(planted):
  root, expected = planted
  out = _run(f"--config.data.root={root}", "--split=train")
  assert out.returncode == 1, out.stderr
  assert f"camvid train ({root}): 22 records, 5 bad" in out.stdout
  bad = [line[len("  bad: "):] for line in out.stdout.splitlines() if line.startswith("  bad: ")]
  assert len(bad) == 5, out.stdout
  for path, reason in expected.items():
    lines = [line for line in bad if line.startswith(path)]
    assert len(lines) == 1 and re.search(reason, lines[0]), (path, bad)
  assert "classes over the 17 records that read" in out.stdout


def test_the_checker_passes_a_clean_copy_and_exits_0(clean):
  out = _run(f"--config.data.root={clean}", "--split=train")
  assert out.returncode == 0, out.stdout + out.stderr
  assert f"camvid train ({clean}): 20 records, 0 bad" in out.stdout
  assert "bad:" not in out.stdout and out.stderr == ""


def test_a_wrong_root_is_one_line_and_exit_2(tmp_path):
  out = _run(f"--config.data.root={tmp_path}")
  assert out.returncode == 2
  assert out.stderr == f"error: {tmp_path / 'images' / 'train'}: the image folder does not exist\n"


def test_the_histogram_counts_pixels_and_images_of_each_class(clean):
  config = data.default_config()
  config.name, config.root = "camvid", str(clean)
  report = check.check_split(config, "train", threads=3)
  raw = [np.asarray(PIL.Image.open(p)) for p in sorted((clean / "labels" / "train").glob("*.png"))]
  for c in range(11):
    assert report.pixels[c + 1] == sum(int((r == c).sum()) for r in raw), c
    assert report.images[c + 1] == sum(bool((r == c).any()) for r in raw), c
  assert report.pixels[0] == sum(int((r == 255).sum()) for r in raw)
  assert (report.records, report.bad, report.good) == (20, [], 20)
  text = check.format_report(report)
  sky = next(line for line in text.splitlines() if line.split()[:2] == ["0", "sky"])
  assert f"{int(report.pixels[1]):,}" in sky
