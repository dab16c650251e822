"""gs:// wherever a local directory works, against a GCS server on loopback (gcs_server.py):
data, workdir (Orbax checkpoints, Grain's iterator, TensorBoard, results), predictions and
converted checkpoints live in a bucket, and nothing lands in a local `gs:` directory.
"""

import io
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from etils import epath

from conftest import REPO, tiny_model_config
from gcs_server import gcs_bucket  # noqa: F401  (the fixture)
from test_convert import _assert_trees_equal
from mlseg_jax import convert, pretrained, train
from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax.evaluation import metrics, predict
from mlseg_jax.tensorboard import open_summary_writer

CAMVID = QUICKSTART_DATA


def _copy_camvid(dst, per_split=None):
  """The first images (and labels) of each split of the bundled CamVid subset."""
  per_split = per_split or {"train": 6, "val": 3}
  dst = epath.Path(dst)
  for split, n in per_split.items():
    for kind in ("images", "labels"):
      (dst / kind / split).mkdir(parents=True, exist_ok=True)
      for f in sorted((CAMVID / kind / split).iterdir())[:n]:
        (dst / kind / split / f.name).write_bytes(f.read_bytes())
  return os.fspath(dst)


def _events(directory):
  """(tag, step, value) of every summary in the TensorBoard event files of a directory
  (value: the scalar, or "image")."""
  from tensorboardX.proto import event_pb2

  out = []
  for f in sorted(epath.Path(directory).glob("events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i < len(data):  # TFRecord: length, its crc, payload, its crc.
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      out += [(v.tag, event.step, "image" if v.HasField("image") else v.simple_value)
              for v in event.summary.value]
      i += 16 + n
  return out


def _json(path):
  return json.loads(epath.Path(path).read_text())


def _no_local_gs_dir(*directories):
  for d in directories:
    assert not (epath.Path(d) / "gs:").exists(), f"a gs:// path became a local one under {d}"


def _reference_checkpoint(model_config, seed=0):
  """Random parameters of the model and their state dict in the reference's names."""
  rng = np.random.default_rng(seed)
  flat = {p: rng.normal(size=s.shape).astype(np.float32)
          for p, s in convert.flatten(convert.abstract_params(model_config)).items()}
  params = convert.unflatten(flat)
  rules = convert.checkpoint_layout("reference", model_config).rules
  return params, {k: np.ascontiguousarray(v)
                  for k, v in convert.from_params(params, rules).items()}


def _torch_bytes(obj):
  buffer = io.BytesIO()
  torch.save(obj, buffer)
  return buffer.getvalue()


def test_tensorboard_scalars_reach_a_bucket_as_a_local_directory(gcs_bucket, tmp_path):
  for workdir in (tmp_path / "run", f"{gcs_bucket}/tb_run"):
    progress = train.Progress(workdir, 3, 0, 1, 8, is_main=True)
    for step in (1, 2, 3):
      progress.write_scalars(step, {"loss": 1.0 / step}, prefix="train")
    progress.close()
  local = _events(tmp_path / "run" / "tensorboard")
  assert local == [("train/loss", s, np.float32(1.0 / s)) for s in (1, 2, 3)]
  assert _events(f"{gcs_bucket}/tb_run/tensorboard") == local
  _no_local_gs_dir(os.getcwd(), tmp_path)


def test_summary_writer_mirrors_its_event_files_to_a_bucket(gcs_bucket, tmp_path):
  remote = epath.Path(gcs_bucket) / "tb"
  writer = open_summary_writer(remote)
  writer.add_scalar("a", 1.0, 1)
  writer.add_image("picture", np.full((3, 4, 4), 7, np.uint8), 1)
  writer.flush()
  assert len(list(remote.glob("events.out.tfevents.*"))) == 1  # Copied on flush ...
  writer.add_scalar("a", 2.0, 2)
  writer.close()  # ... and everything on close.
  assert _events(remote) == [("a", 1, 1.0), ("picture", 1, "image"), ("a", 2, 2.0)]
  assert not os.path.exists(writer.logdir)  # The local staging directory is gone.
  local = open_summary_writer(tmp_path / "tb")
  assert local.logdir == os.fspath(tmp_path / "tb")  # Local: tensorboardX's own writer.
  local.close()
  _no_local_gs_dir(os.getcwd(), tmp_path)


def test_checkpoint_files_on_gcs_convert_to_gcs_and_export_back(gcs_bucket, tmp_path):
  c = tiny_model_config("mlseg", n_layers=3, topk=3)
  params, state = _reference_checkpoint(c)
  root = epath.Path(gcs_bucket) / "convert"
  root.mkdir(parents=True, exist_ok=True)
  (root / "ref.pth").write_bytes(_torch_bytes(
      {"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}))
  (root / "ref.safetensors").write_bytes(safetensors.numpy.save(state))
  for name in ("ref.pth", "ref.safetensors"):
    out = os.fspath(root / name.replace(".", "_"))
    assert convert.convert_to_orbax("reference", root / name, c, out) == []
    _assert_trees_equal(pretrained.load_params(out), params)
    assert pretrained.load_info(out)["source"]["file"] == os.fspath(root / name)
  # An .npz reads the same from a bucket.
  buffer = io.BytesIO()
  np.savez(buffer, **{k.replace(".", "/"): v for k, v in state.items()})
  (root / "ref.npz").write_bytes(buffer.getvalue())
  arrays = convert.read_checkpoint(root / "ref.npz")
  assert {k: v.tobytes() for k, v in arrays.items()} == {
      k.replace(".", "/"): v.tobytes() for k, v in state.items()}
  # Overwriting a converted directory in a bucket, then exporting it to the bucket.
  out = os.fspath(root / "ref_pth")
  with pytest.raises(FileExistsError):
    pretrained.save_params(out, params)
  pretrained.save_params(out, params, model_config=c, overwrite=True)
  exported = convert.export_torch(out, root / "back.pth")
  loaded = torch.load(io.BytesIO((root / "back.pth").read_bytes()), weights_only=True)
  assert loaded["meta"]["mlseg_jax"]["from"] == out
  assert sorted(loaded["state_dict"]) == sorted(exported) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(loaded["state_dict"][k].numpy(), v, err_msg=k)
  fresh = convert.unflatten({p: np.zeros_like(v) for p, v in convert.flatten(params).items()})
  initialised, kept = pretrained.init_from(fresh, out)
  _assert_trees_equal(initialised, params)
  assert kept == []
  _no_local_gs_dir(os.getcwd(), tmp_path)


def test_predict_reads_and_writes_a_bucket_as_a_local_directory(gcs_bucket, tmp_path):
  from test_predict import NAMES, PALETTE, SETTINGS, colour_model

  kw = dict(palette=PALETTE, class_names=NAMES, topk=2)
  written = {}
  for root in (tmp_path, gcs_bucket):
    images = _copy_camvid(f"{root}/data", {"val": 2})
    written[root] = predict.predict_images(colour_model(topk=2), f"{images}/images/val",
                                           f"{root}/predictions", SETTINGS, **kw)
  local, remote = written[tmp_path], written[gcs_bucket]
  assert [w["mask"] for w in remote] == [
      f"{gcs_bucket}/predictions/{epath.Path(w['image']).stem}_mask.png" for w in remote]
  for l, r in zip(local, remote):
    for key in ("mask", "overlay"):
      assert epath.Path(r[key]).read_bytes() == epath.Path(l[key]).read_bytes()
    lc, rc = (_json(w["classes"]) for w in (l, r))
    assert lc["selected"] == rc["selected"] and rc["image"] == r["image"]
  _no_local_gs_dir(os.getcwd(), tmp_path)


def test_a_bucket_workdir_is_checked_before_anything_runs(gcs_bucket, monkeypatch):
  from mlseg_jax import errors, paths

  run = epath.Path(f"{gcs_bucket}/checked_run")
  assert paths.writable_directory(run) == run
  assert not run.exists()  # The probe is gone, and a bucket needs no folder made.
  missing = "gs://no-such-bucket-here/run"
  with pytest.raises(errors.UserError) as raised:
    paths.writable_directory(missing)
  assert str(raised.value) == (f"--workdir {missing}: the bucket no-such-bucket-here does "
                               "not exist (or these credentials cannot see it)")

  def forbidden(self, data):  # What gcsfs raises for a 403, e.g. a read-only service account.
    raise OSError(f"Forbidden: http://storage/upload?name={self.name}\nrunner@p.iam does "
                  "not have storage.objects.create access to the object.")

  monkeypatch.setattr(type(run), "write_bytes", forbidden)
  with pytest.raises(errors.UserError) as raised:
    paths.writable_directory(run, "--output")
  assert str(raised.value) == (f"--output {run} is not writable with these credentials: "
                               "runner@p.iam does not have storage.objects.create access to "
                               "the object.")


def test_evaluation_results_are_written_to_a_bucket(gcs_bucket, tmp_path):
  results = {"aAcc": 0.5, "mIoU": 0.25, "mAcc": float("nan"), "IoU": {"a": 0.25},
             "Acc": {"a": float("nan")}}
  path = metrics.write_results(results, f"{gcs_bucket}/eval", "ss")
  assert os.fspath(path) == f"{gcs_bucket}/eval/ss.json"
  assert _json(path)["mAcc"] is None
  assert "mIoU" in (epath.Path(gcs_bucket) / "eval" / "ss.txt").read_text()
  _no_local_gs_dir(os.getcwd(), tmp_path)


# ---------------------------------------------------------------------------------------
# End to end: `python -m mlseg_jax.main` and `python -m mlseg_jax.convert` on a bucket.

# Killed after the checkpoint at 8, resumed to 16. The evaluation at 8 runs while Orbax
# finishes that checkpoint in the background (about 1 s here): the kill lands after it, well
# before the next one.
STEPS, EVERY = 16, 8
MODEL = {"model.backbone_depth": 2}
SETTINGS = dict(MODEL, **{
    "data.crop_size": "(64,64)", "data.img_scale": "(120,90)", "data.test_scale": "(120,90)",
    "eval.stride": "(64,64)", "eval.max_images": 2, "optim.name": "sgd", "optim.lr": 0.01,
    "optim.warmup_steps": 0, "train.total_steps": STEPS, "train.checkpoint_every": EVERY,
    "train.eval_every": EVERY, "train.log_every": 1})


def _config_args(settings):
  return ["--config", REPO / "configs" / "quickstart.py",
          *(f"--config.{k}={v}" for k, v in settings.items())]


def _main_args(workdir, data, **changes):
  """quickstart, tiny, on `data`; changes: {"optim__lr": 0} sets optim.lr."""
  settings = dict(SETTINGS, **{"data.root": data},
                  **{k.replace("__", "."): v for k, v in changes.items()})
  return ["--workdir", workdir, *_config_args(settings)]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             # The test session's compilation cache: each run compiles the same programs.
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for k in ("MLSEG_COORDINATOR", "MLSEG_NUM_PROCESSES", "MLSEG_PROCESS_ID", "SLURM_JOB_ID"):
    env.pop(k, None)
  return env


def _start(cwd, module, *args):
  return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(cwd, module, *args):
  proc = _start(cwd, module, *args)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-6000:]
  return out


def _kill_after_checkpoint(cwd, args, workdir):
  """Starts training, kill -9 once it is past the (complete) checkpoint at EVERY and
  well before the next one; returns the step it was killed at."""
  # On GCS, Orbax marks a finished checkpoint with this file (no atomic rename there).
  done = epath.Path(workdir) / "checkpoints" / str(EVERY) / "commit_success.txt"
  proc = _start(cwd, "mlseg_jax.main", *args)
  log, killed_at = [], None
  try:
    for line in proc.stdout:
      log.append(line)
      m = re.search(rf"step (\d+)/{STEPS}\b", line)
      step = int(m.group(1)) if m else 0
      if step > EVERY and done.exists():
        proc.kill()
        killed_at = step
        break
      if step >= 2 * EVERY - 2:  # Its checkpoint never finished: do not race the next one.
        break
  finally:
    proc.kill()
    log.append(proc.communicate(timeout=60)[0])
  assert killed_at is not None, "".join(log)[-6000:]
  return killed_at


@pytest.mark.slow
def test_training_on_gcs_killed_and_resumed_equals_a_local_run_then_eval_predict_convert(
    gcs_bucket, tmp_path):
  cwd = tmp_path / "cwd"  # Where the commands run: a stray relative `gs:` dir would land here.
  cwd.mkdir()
  bucket = epath.Path(gcs_bucket)
  data, local_data = _copy_camvid(bucket / "camvid"), _copy_camvid(tmp_path / "camvid")
  run, local = bucket / "run", tmp_path / "local"

  _run(cwd, "mlseg_jax.main", *_main_args(local, local_data))
  killed_at = _kill_after_checkpoint(cwd, _main_args(run, data), run)
  assert EVERY < killed_at < 2 * EVERY
  steps = {p.name for p in (run / "checkpoints").iterdir()}
  assert str(EVERY) in steps and str(STEPS) not in steps
  resumed = _run(cwd, "mlseg_jax.main", *_main_args(run, data))
  assert re.search(rf"step {EVERY + 1}/{STEPS}\b", resumed)  # From the checkpoint at 8.
  assert not re.search(rf"step {EVERY}/{STEPS}\b", resumed)

  # Bitwise the uninterrupted local run: the model and the data order resumed exactly.
  final = pretrained.load_params(run / "checkpoints" / str(STEPS))
  _assert_trees_equal(final, pretrained.load_params(local / "checkpoints" / str(STEPS)))
  for name, key in (("train_metrics.json", "loss"), (f"eval/step_{STEPS}_ss.json", "mIoU")):
    assert _json(run / name)[key] == _json(local / name)[key], name
  assert _json(run / "config.json")["data"]["root"] == data
  logged = {(t, s) for t, s, _ in _events(run / "tensorboard")}
  assert ("train/loss", STEPS) in logged  # Training scalars ...
  assert any(t.endswith("/mIoU") and s == STEPS for t, s in logged)  # ... and evaluation's.

  # Evaluation and pictures from the bucket's workdir, into the bucket.
  _run(cwd, "mlseg_jax.main", "--mode", "eval", *_main_args(run, data))
  evaluated = _json(run / "eval" / "ss.json")
  assert evaluated["mIoU"] == _json(run / "eval" / f"step_{STEPS}_ss.json")["mIoU"]
  _run(cwd, "mlseg_jax.main", "--mode", "predict", *_main_args(run, data),
       "--images", f"{data}/images/val", "--output", bucket / "predictions")
  stems = sorted(f.stem for f in (CAMVID / "images" / "val").iterdir())[:3]
  assert sorted(p.name for p in (bucket / "predictions").iterdir()) == sorted(
      f"{s}_{kind}" for s in stems
      for kind in ("classes.json", "mask.png", "overlay.png", "overlay_legend.png"))

  # The trained step -> reference .pth in the bucket -> converted in the bucket -> a local .pth.
  model_config = pretrained.model_config_from_info({"model": _json(run / "config.json")["model"]})
  state = convert.export_torch(run / "checkpoints" / str(STEPS), bucket / "trained.pth",
                               model_config)
  converted = bucket / "converted"
  _run(cwd, "mlseg_jax.convert", "--format", "reference", "--input", bucket / "trained.pth",
       *_config_args(MODEL), "--output", converted)
  _assert_trees_equal(pretrained.load_params(converted), final)
  _run(cwd, "mlseg_jax.convert", "--to", "torch", "--input", converted,
       "--output", tmp_path / "back.pth")
  back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)

  # Training starts from the converted directory in the bucket (lr 0: the weights stay).
  init_run = bucket / "from_converted"
  _run(cwd, "mlseg_jax.main", *_main_args(
      init_run, data, init_from=converted, optim__lr=0, optim__min_lr=0,
      train__total_steps=1, train__eval_every=1, eval__max_images=1))
  _assert_trees_equal(pretrained.load_params(init_run / "checkpoints" / "1"), final)

  for d in (run, init_run):
    for name in ("config.json", "train_metrics.json", "tensorboard"):
      assert (d / name).exists(), d / name
  assert sorted(os.listdir(cwd)) == []
  _no_local_gs_dir(cwd, tmp_path, REPO, os.getcwd())
