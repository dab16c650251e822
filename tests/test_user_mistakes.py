"""Quiet mistakes a user makes on the command line, each refused in one line (exit 2) or
done as the user means: overrides without --config, a total_steps below the checkpoint, a
negative learning rate, predict's output inside its input, a folder with no image."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import QUICKSTART_STEPS, REPO, TINY, assert_user_error, run_main


def _assert_user_error(proc, *needles):
  assert_user_error(proc, *needles, max_lines=4)


def test_eval_overrides_without_config_apply_to_the_workdirs_config(trained_quickstart,
                                                                     tmp_path):
  workdir = trained_quickstart.copy_to(tmp_path / "wd")
  proc = run_main("--mode", "eval", "--workdir", workdir, "--config.eval.run=('ms_flip',)",
                  "--config.eval.scales=(1.0,)", "--config.eval.max_images=2",
                  f"--config.compilation_cache={trained_quickstart.cache}")
  results = json.loads((workdir / "eval" / "ms_flip.json").read_text())
  assert results["num_images"] == 2 and results["settings"]["flip"] is True
  assert results["settings"]["ratios"] == [1.0]
  # An override that changes the model is still checked against the run's config.
  _assert_user_error(run_main("--mode", "eval", "--workdir", workdir, "--config.model.d_ff=8",
                              check=False), "model.d_ff: 8 here")
  assert "config of the run" in proc.stderr


def test_overrides_with_no_config_to_override_say_that_config_is_needed(tmp_path):
  _assert_user_error(
      run_main("--workdir", tmp_path, "--config.train.total_steps=5", check=False),
      "error: --config.train.total_steps overrides a field of --config, and there is no "
      "--config: pass --config")
  # eval of a folder that holds no run: the same line (no config.json to take).
  _assert_user_error(run_main("--mode", "eval", "--workdir", tmp_path,
                              "--config.eval.run=('ss',)", check=False),
                     "overrides a field of --config, and there is no --config")


def test_total_steps_below_the_checkpoint_is_refused_naming_both(trained_quickstart, tmp_path):
  workdir = trained_quickstart.copy_to(tmp_path / "wd")
  proc = run_main("--config", "configs/quickstart.py", *TINY, "--workdir", workdir,
                  f"--config.train.total_steps={QUICKSTART_STEPS - 1}", check=False)
  _assert_user_error(proc, f"train.total_steps={QUICKSTART_STEPS - 1} is below step "
                     f"{QUICKSTART_STEPS}, the newest checkpoint in")
  assert (workdir / "checkpoints" / str(QUICKSTART_STEPS)).is_dir()  # Untouched.


def test_a_negative_learning_rate_and_other_bad_rates_are_refused(tmp_path):
  base = ["--config", "configs/quickstart.py", "--workdir", tmp_path]
  _assert_user_error(run_main(*base, "--config.optim.lr=-0.001", "--config.optim.momentum=1.5",
                              "--config.optim.weight_decay=-0.01", check=False),
                     "optim.lr=-0.001 must be >= 0", "optim.momentum=1.5 must be in [0, 1)",
                     "optim.weight_decay=-0.01 must be >= 0")
  assert not (tmp_path / "checkpoints").exists()


def test_predict_refuses_an_output_inside_its_images_and_a_folder_without_images(
    trained_quickstart, tmp_path):
  images = tmp_path / "photos"
  images.mkdir()
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(images / "a.png")
  for output in (images, images / "out"):
    _assert_user_error(run_main("--mode", "predict", "--workdir", trained_quickstart.workdir,
                                "--images", images, "--output", output, check=False),
                       f"--output {output} is inside --images {images}")
  assert sorted(p.name for p in images.iterdir()) == ["a.png"]  # Nothing written.
  empty = tmp_path / "notes"
  empty.mkdir()
  (empty / "readme.txt").write_text("no pictures here")
  _assert_user_error(run_main("--mode", "predict", "--workdir", trained_quickstart.workdir,
                              "--images", empty, "--output", tmp_path / "out", check=False),
                     "error: no image files (.jpg", f"in {empty}")


def _tool(module, *args):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)


def test_the_data_and_conversion_tools_name_a_missing_input_in_one_line(tmp_path):
  for dataset, src in (("coco_stuff10k", tmp_path / "nothere"),
                       ("pascal_context", tmp_path / "nothere.json")):
    _assert_user_error(_tool("mlseg_jax.data.prepare", dataset, "--src", src,
                             "--dst", tmp_path / "out"), f"error: --src {src} does not exist")
  (tmp_path / "lists").mkdir()
  _assert_user_error(_tool("mlseg_jax.data.prepare", "coco_stuff10k", "--src",
                           tmp_path / "lists", "--dst", tmp_path / "out"),
                     "imageLists/train.txt: image list not found")
  _assert_user_error(_tool("mlseg_jax.convert", "--to", "torch", "--input", tmp_path / "gone",
                           "--output", tmp_path / "x.pth"),
                     f"error: {tmp_path / 'gone'} does not exist")
  _assert_user_error(_tool("mlseg_jax.data.check", "--config", "configs/quickstart.py",
                           "--config.data.crop_size=128"),
                     "data.crop_size=(128,) must be two positive integers (h, w)")
