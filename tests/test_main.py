"""The command line: train -> eval -> predict on the quickstart config, and refusals."""

import json
import os

import pytest
from PIL import Image

from conftest import QUICKSTART_STEPS, REPO, SHARED_DATA, TINY, run_main as _main
from conftest import assert_user_error as _assert_user_error


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_predicts(trained_quickstart, tmp_path):
  # Trained as users run it (conftest.trained_quickstart: a relative workdir, the
  # repository's quickstart config); the evaluations below write into a copy.
  assert (trained_quickstart.workdir / "checkpoints" / str(QUICKSTART_STEPS)).is_dir()
  assert (trained_quickstart.workdir / "eval" / f"step_{QUICKSTART_STEPS}_ss.json").is_file()
  assert list((trained_quickstart.workdir / "tensorboard").iterdir())
  workdir = trained_quickstart.copy_to(tmp_path / "wd")
  config = ["--config", "configs/quickstart.py", "--workdir", os.path.relpath(workdir, REPO),
            *TINY]

  # The run's own config when --config is left out; a different model is refused by field.
  out = _main("--mode", "eval", "--workdir", str(workdir))
  assert "using the config of the run in" in out.stderr
  wrong = _main("--config", "configs/quickstart.py", "--workdir", str(workdir), "--mode",
                "eval", "--config.model.topk=5", check=False)
  _assert_user_error(wrong, "model.backbone_depth: 4 here, 2 in",
                     "model.topk: 5 here, 9 in")

  out = _main(*config, "--mode", "eval", "--config.eval.run=ms_flip",
              "--config.eval.scales=(0.75,1.0)")
  results = json.loads((workdir / "eval" / "ms_flip.json").read_text())
  assert 0.0 <= results["mIoU"] <= 1.0 and results["num_images"] == 4
  assert len(results["IoU"]) == 11 and "sky" in results["IoU"]
  assert "ms_flip/mIoU" in out.stdout
  assert "pole" in (workdir / "eval" / "ms_flip.txt").read_text()

  images = SHARED_DATA / "camvid" / "images" / "val"
  one = sorted(images.iterdir())[0]
  _main(*config, "--mode", "predict", "--images", str(one), "--output", str(tmp_path / "pred"))
  pictures = sorted(p.name for p in (tmp_path / "pred").iterdir())
  assert any("overlay" in p for p in pictures) and any("mask" in p for p in pictures)
  mask = [p for p in (tmp_path / "pred").iterdir() if "mask" in p.name][0]
  assert Image.open(mask).size == Image.open(one).size

  # A folder with a bad file: the good image's pictures are written, the exit code says not all.
  folder = tmp_path / "mixed"
  folder.mkdir()
  (folder / one.name).write_bytes(one.read_bytes())
  (folder / "broken.jpg").write_bytes(one.read_bytes()[:300])
  proc = _main(*config, "--mode", "predict", "--images", str(folder), "--output",
               str(tmp_path / "mixed_out"), check=False)
  _assert_user_error(proc, "1 of 2 images could not be read", "broken.jpg")
  assert {p.name for p in (tmp_path / "mixed_out").iterdir()} == {
      f"{one.stem}_mask.png", f"{one.stem}_overlay.png", f"{one.stem}_overlay_legend.png",
      f"{one.stem}_classes.json"}


def test_command_line_mistakes_get_one_clear_line(tmp_path):
  base = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path)]
  _assert_user_error(_main(*base, "--config.train.batchsize=4", check=False),
                     "error: config.train.batchsize is not a config field; did you mean "
                     "config.train.batch_size?")
  _assert_user_error(_main(*base, "--config.eval.multi_scale=True", check=False),
                     "error: config.eval.multi_scale is not a config field; did you mean "
                     "config.eval.run?")  # A removed field, named by its successor.
  _assert_user_error(_main(*base, "--config.data.crop_size=128", check=False),
                     "data.crop_size=(128,) must be two positive integers (h, w)")
  _assert_user_error(_main("--config", "configs/nothere.py", "--workdir", str(tmp_path),
                           check=False), "No such file or directory: 'configs/nothere.py'")
  _assert_user_error(_main("--config", "configs/quickstart.py:bogus", check=False),
                     "config argument 'bogus' is not one of ['runlocal']")
  _assert_user_error(_main("--mode", "eval", "--workdir", str(tmp_path), check=False),
                     "--config is required (or a --workdir holding config.json)")
  shown = _main(*base, "--config.train.batch_size=0", "--traceback", check=False)
  assert shown.returncode != 0 and "Traceback" in shown.stderr  # What --traceback is for.


def test_help_lists_the_entry_points_flags_and_exits_0():
  proc = _main("--help")
  assert proc.returncode == 0, proc.stderr
  for flag in ("--config:", "--workdir:", "--mode:", "--images:", "--output:",
               "--[no]traceback:"):
    assert flag in proc.stdout, flag


def test_bad_overrides_are_refused(tmp_path):
  base = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path)]
  proc = _main(*base, "--config.train.batchsize=4", check=False)
  assert proc.returncode != 0 and "batchsize" in proc.stderr
  proc = _main(*base, "--config.model.topk=20", check=False)
  assert proc.returncode != 0 and "model.topk=20" in proc.stderr
  proc = _main(*base, "--config.train.batch_size=7", check=False)
  assert proc.returncode != 0 and "not divisible by the data-parallel size 2" in proc.stderr
  proc = _main(*base, "--mode", "eval", check=False)
  assert proc.returncode != 0 and "nothing to evaluate" in proc.stderr
