"""Export: the window model as StableHLO and as ONNX computes what the JAX forward does."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from mlseg_jax import checkpoints, errors, export, pretrained, train
from mlseg_jax.evaluation import evaluators
from mlseg_jax.models.segmenter import build_model
from test_train import tiny_train_config

WINDOW = (64, 64)
N = 2  # Windows per call: one compilation of each reference forward.


def _windows(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *WINDOW, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{decoder: (config, params, workdir, config to pass)}: an MLSeg training workdir (its
  config.json and a checkpoint, the config left to the workdir) and mask-transformer weights
  written by save_params (--config with config.init_from, no workdir)."""
  root = tmp_path_factory.mktemp("export")
  out = {}
  for seed, decoder in enumerate(("mlseg", "mask_transformer")):
    config = tiny_train_config(decoder)
    config.eval.stride = WINDOW
    init = jax.jit(lambda key: build_model(config.model).init(key, jnp.zeros((1, *WINDOW, 3))))
    params = jax.device_get(init(jax.random.PRNGKey(seed))["params"])
    if decoder == "mlseg":
      workdir = root / decoder
      mngr = checkpoints.checkpoint_manager(workdir, config)
      state = train.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                               opt_state=jnp.zeros(()), rng=jax.random.PRNGKey(0))
      checkpoints.save_checkpoint(mngr, state, force=True)
      mngr.wait_until_finished()
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
      out[decoder] = (config, params, str(workdir), None)
    else:
      config.init_from = str(pretrained.save_params(root / decoder, params,
                                                    model_config=config.model))
      out[decoder] = (config, params, None, config)
  return out


def _reference(config, windows, params):
  return jax.device_get(evaluators.make_predict_fn(config.model)(params, windows))


def _assert_same_outputs(got, want, atol=1e-4):
  assert sorted(got) == sorted(want)
  # MLSeg: the same k classes selected in every cell, -100 elsewhere.
  np.testing.assert_array_equal(got["logits"] > -100, want["logits"] > -100)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("decoder", ["mask_transformer", "mlseg"])
def test_stablehlo_round_trip_equals_the_jax_forward(runs, decoder, tmp_path):
  config, params, workdir, given = runs[decoder]
  path = tmp_path / "model.stablehlo"
  meta = export.export(given, workdir, "stablehlo", path, window=None)
  exported = jax.export.deserialize(path.read_bytes())
  assert not isinstance(exported.in_avals[0].shape[0], int)  # A symbolic batch.
  windows = _windows(N)
  _assert_same_outputs(jax.device_get(exported.call(windows)),
                       _reference(config, windows, params))
  side = json.loads((tmp_path / "model.stablehlo.json").read_text())
  assert side == meta
  names = ["logits", "image_logits"] if decoder == "mlseg" else ["logits"]
  assert side["output_names"] == names and side["outputs"]["logits"]["shape"] == [
      "batch", 4, 4, 11]
  assert side["input"]["shape"] == ["batch", 64, 64, 3] and side["window"] == [64, 64]
  assert side["patch_size"] == 16 and side["decoder"] == decoder
  assert side["topk"] == (4 if decoder == "mlseg" else None)
  assert len(side["class_names"]) == 11 and len(side["normalisation"]["mean"]) == 3


def test_onnxruntime_equals_the_jax_forward_at_a_symbolic_batch(runs, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  config, params, _, given = runs["mask_transformer"]
  meta = export.export(given, None, "onnx", tmp_path / "m.onnx", window="64")
  session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
  assert [i.shape for i in session.get_inputs()] == [["batch", 64, 64, 3]]
  windows = _windows(N, seed=1)
  got = dict(zip(meta["output_names"], session.run(meta["output_names"], {"windows": windows})))
  _assert_same_outputs(got, _reference(config, windows, params))
  # The converter's plugins replace jax functions when they load; the caller's process gets
  # jax's own back (a positional axis is what the converter's jnp.cumsum refuses).
  assert not jnp.cumsum.__module__.startswith("jax2onnx")
  np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 3)), 1)[:, -1], [3, 3])
  with pytest.raises(errors.UsageError, match="exists; pass --overwrite"):
    export.export(given, None, "onnx", tmp_path / "m.onnx")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.Popen([sys.executable, "-m", "mlseg_jax.export", *map(str, args)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=300)
  return proc.returncode, stdout, stderr


def test_cli_writes_the_onnx_of_mlseg_with_its_gating(runs, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  config, params, workdir, _ = runs["mlseg"]
  path = tmp_path / "mlseg.onnx"
  code, stdout, stderr = _finish(_cli("--workdir", workdir, "--format", "onnx", "--window",
                                      "64,64", "--batch", N, "--output", path))
  assert code == 0, stderr[-3000:]
  assert stdout.strip() == (f"wrote {path} (onnx: windows (2, 64, 64, 3) -> logits "
                            f"(2, 4, 4, 11), image_logits (2, 11)) and {path}.json")
  meta = json.loads((tmp_path / "mlseg.onnx.json").read_text())
  assert meta["output_names"] == ["logits", "image_logits"] and meta["unselected_logit"] == -100
  assert meta["weights"].endswith("/checkpoints/3") and meta["opset"] == export.ONNX_OPSET
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  windows = _windows(N, seed=2)
  got = dict(zip(meta["output_names"], session.run(None, {"windows": windows})))
  _assert_same_outputs(got, _reference(config, windows, params))
  assert ((got["logits"] > -100).sum(-1) == 4).all()  # k classes per cell.


def test_mistakes_end_in_one_line(runs, tmp_path):
  config, _, workdir, _ = runs["mlseg"]
  gt = tmp_path / "gt"
  gt.mkdir()
  saved = json.loads(config.to_json_best_effort())
  saved["model"]["decoder"] = "mlseg_gt"
  (gt / "config.json").write_text(json.dumps(saved))
  out = tmp_path / "m.stablehlo"
  cases = {
      ("--workdir", workdir, "--format", "tflite", "--output", out): "--format",
      ("--workdir", gt, "--format", "stablehlo", "--output", out): "+GT oracle",
      ("--workdir", tmp_path / "none", "--format", "onnx", "--output", out):
          "does not exist",
  }
  runs = {args: _cli(*args) for args in cases}  # Side by side: each is mostly imports.
  usage = _cli("--help")
  for args, words in cases.items():
    code, _, stderr = _finish(runs[args])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, stderr[-3000:])
    assert lines[0].startswith("error: ") and words in lines[0], lines
  assert not out.exists()
  code, stdout, _ = _finish(usage)
  assert code == 0 and "--format" in stdout and "--window" in stdout


def test_window_is_a_multiple_of_the_patch():
  assert export.parse_window("512", (64, 64), 16) == (512, 512)
  assert export.parse_window("512,672", (64, 64), 16) == (512, 672)
  assert export.parse_window(None, (64, 48), 16) == (64, 48)
  for text, words in (("60", "not a multiple of the patch size 16"), ("a", "height,width"),
                      ("1,2,3", "height,width")):
    with pytest.raises(errors.UsageError, match=words):
      export.parse_window(text, (64, 64), 16)


def test_onnx_without_its_converter_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # Its import now fails.
  with pytest.raises(errors.UserError, match="pip install .jax2onnx"):
    export.import_onnx_converter()
