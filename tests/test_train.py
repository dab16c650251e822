import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_model_config
from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import checkpoints
from mlseg_jax import train
from mlseg_jax.main import validate_config


def tiny_train_config(decoder="mask_transformer", **train_overrides):
  from mlseg_jax.configs.common import get_base_config

  config = get_base_config()
  config.unlock()
  config.model = tiny_model_config(decoder=decoder, num_classes=11, topk=4, pool_grid=2)
  config.lock()
  config.data.name = "camvid"
  config.data.root = str(QUICKSTART_DATA)
  config.data.crop_size = (64, 64)
  config.data.img_scale = (120, 90)
  config.data.test_scale = (120, 90)
  config.data.num_workers = 0
  config.optim.weight_decay = 1e-4
  t = config.train
  t.batch_size = 8
  t.total_steps = 10
  t.log_every = 5
  t.checkpoint_every = 5
  t.eval_every = 1000
  t.async_checkpoints = True
  config.init_from = ""
  for k, v in train_overrides.items():
    setattr(t, k, v)
  return config


def random_batches(seed=0, batch=8, size=64, num_classes=11):
  rng = np.random.default_rng(seed)
  while True:
    labels = rng.integers(0, num_classes, size=(batch, size // 8, size // 8))
    labels = labels.repeat(8, 1).repeat(8, 2).astype(np.int32)
    labels[:, :4] = -1
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32) + labels[..., None] * 0.3
    yield {"image": images, "label": labels}


def _one_step(config, devices, batch):
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  _, mesh, state, _, step_fn = train.setup(config, mesh)
  batch = train.global_batch(batch, mesh)
  for _ in range(2):
    state, metrics = step_fn(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_data_parallel_step_on_8_devices_matches_1_device():
  config = tiny_train_config(decoder="mask_transformer")
  batch = next(random_batches())
  params1, m1 = _one_step(config, jax.devices()[:1], batch)
  params8, m8 = _one_step(config, jax.devices()[:8], batch)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(params1), jax.tree_util.tree_leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_reproduces_the_full_batch_step():
  batch = next(random_batches(1))
  config = tiny_train_config(decoder="mask_transformer")
  config.model.dropout = 0.0
  config.model.drop_path_rate = 0.0
  params_full, m_full = _one_step(config, jax.devices()[:2], batch)
  config.train.grad_accum_steps = 2
  params_acc, m_acc = _one_step(config, jax.devices()[:2], batch)
  np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(params_full), jax.tree_util.tree_leaves(params_acc)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_shards_large_parameters_and_their_optimizer_state():
  config = tiny_train_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.min_fsdp_size = 2, 4, 4096
  config.optim.name = "adamw"
  mesh = sharding_lib.make_mesh(config.mesh)
  _, _, state, shardings, _ = train.setup(config, mesh)
  fc1 = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (64, 256)
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert fc1.addressable_shards[0].data.shape == (64, 64)
  mu = state.opt_state[0].mu["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  bias = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["bias"]  # Small: replicated.
  assert bias.sharding.spec == jax.sharding.PartitionSpec()


def test_training_reduces_the_loss_and_the_mlseg_image_loss(tmp_path):
  config = tiny_train_config(decoder="mlseg", total_steps=30, log_every=30,
                             checkpoint_every=30)
  config.model.dropout = 0.0
  config.optim.name = "adamw"
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 0
  config.optim.min_lr = 2e-3
  batches = random_batches(2)
  fixed = next(batches)
  mesh = sharding_lib.make_mesh(config.mesh)
  _, mesh, state, _, step_fn = train.setup(config, mesh)
  batch = train.global_batch(fixed, mesh)
  history = []
  for _ in range(30):
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  first, last = history[0], np.mean([h["loss"] for h in history[-3:]])
  assert last < 0.7 * first["loss"], (first["loss"], last)
  assert np.mean([h["loss_img"] for h in history[-3:]]) < 0.7 * first["loss_img"]


def test_training_on_camvid_crops_reduces_the_loss(tmp_path):
  config = tiny_train_config(decoder="mlseg", total_steps=24, log_every=8,
                             checkpoint_every=24)
  config.model.dropout = 0.0
  config.optim.name = "adamw"
  config.optim.lr = 2e-3
  config.optim.min_lr = 2e-3
  config.data.photometric = False
  from mlseg_jax import data as data_lib

  it = data_lib.make_train_iterator(config.data, 8, 0)
  losses = []
  mesh = sharding_lib.make_mesh(config.mesh)
  _, mesh, state, _, step_fn = train.setup(config, mesh)
  for _ in range(24):
    state, metrics = step_fn(state, train.global_batch(next(it), mesh))
    losses.append(jax.device_get(metrics))
  assert np.mean([m["loss"] for m in losses[-4:]]) < np.mean([m["loss"] for m in losses[:4]])
  assert np.mean([m["loss_img"] for m in losses[-4:]]) < np.mean([m["loss_img"] for m in losses[:4]])


def test_ten_steps_equal_five_plus_restart_plus_five(tmp_path):
  from mlseg_jax import data as data_lib

  config = tiny_train_config(decoder="mask_transformer")
  config.data.photometric = True
  straight, _ = train.train(config, tmp_path / "straight",
                            data_iter=data_lib.make_train_iterator(config.data, 8, 0))
  split_dir = tmp_path / "split"
  first, _ = train.train(config, split_dir, stop_after=5,
                         data_iter=data_lib.make_train_iterator(config.data, 8, 0))
  assert int(first.step) == 5
  resumed, _ = train.train(config, split_dir,
                           data_iter=data_lib.make_train_iterator(config.data, 8, 0))
  assert int(resumed.step) == 10
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(straight.params)),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)


def test_device_prefetch_trains_exactly_as_reading_in_the_loop(tmp_path):
  params = {}
  for prefetch in (0, 3):
    config = tiny_train_config(total_steps=4, prefetch=prefetch)
    state, _ = train.train(config, tmp_path / str(prefetch), data_iter=random_batches(seed=5))
    params[prefetch] = jax.device_get(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(params[0]), jax.tree_util.tree_leaves(params[3])):
    np.testing.assert_array_equal(a, b)


def _big_state(step):
  """A TrainState of ~400 MB: slow enough to save that a kill lands mid-write."""
  w = np.full((100, 1024, 1024), float(step), np.float32)
  return train.TrainState(step=jnp.asarray(step, jnp.int32), params={"w": w},
                          opt_state={"m": w[:1]}, rng=jnp.zeros(2, jnp.uint32))


def test_a_checkpoint_survives_a_process_killed_mid_save(tmp_path):
  """Kill -9 while a checkpoint is being written: the previous one still restores."""
  script = tmp_path / "run.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
      from test_train import tiny_train_config, _big_state
      from mlseg_jax import checkpoints
      config = tiny_train_config()
      config.train.async_checkpoints = False
      mngr = checkpoints.checkpoint_manager({str(tmp_path / 'wd')!r}, config)
      checkpoints.save_checkpoint(mngr, _big_state(1)); mngr.wait_until_finished()
      print("SAVING2", flush=True)
      checkpoints.save_checkpoint(mngr, _big_state(2)); mngr.wait_until_finished()
      print("SAVED2", flush=True)
      """))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  for line in proc.stdout:
    if line.startswith("SAVING2"):
      # The 400 MB write has just begun; it takes far longer than this to finish.
      time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  mngr = checkpoints.checkpoint_manager(tmp_path / "wd", tiny_train_config())
  assert mngr.latest_step() == 1, mngr.all_steps()  # Step 2 never completed.
  target = jax.eval_shape(lambda: _big_state(0))
  replicated = sharding_lib.replicated(sharding_lib.make_mesh(tiny_train_config().mesh,
                                                                devices=jax.devices()[:1]))
  restored = checkpoints.restore_checkpoint(mngr, target,
                                      jax.tree_util.tree_map(lambda _: replicated, target))
  assert int(restored.step) == 1 and float(restored.params["w"][7, 3, 5]) == 1.0


def test_an_interrupted_run_saves_its_progress(tmp_path):
  config = tiny_train_config(total_steps=10, checkpoint_every=100)

  def failing_batches():
    it = random_batches(3)
    for _ in range(3):
      yield next(it)
    raise RuntimeError("disk went away")

  with pytest.raises(RuntimeError, match="disk went away"):
    train.train(config, tmp_path, data_iter=failing_batches())
  mngr = checkpoints.checkpoint_manager(tmp_path, config)
  assert mngr.latest_step() == 3


def test_inconsistent_configs_are_refused():
  config = tiny_train_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the data-parallel size 8"):
    validate_config(config, num_devices=8)
  config = tiny_train_config(decoder="mlseg")
  config.model.topk = 12
  with pytest.raises(ValueError, match="model.topk=12"):
    validate_config(config, num_devices=1)
  config = tiny_train_config(prefetch=-1)
  with pytest.raises(ValueError, match="train.prefetch=-1"):
    validate_config(config, num_devices=1)
  config = tiny_train_config()
  config.data.crop_size = (60, 64)
  with pytest.raises(ValueError, match="data.crop_size=\\(60, 64\\) is not a multiple"):
    validate_config(config, num_devices=1)
  config = tiny_train_config()
  with pytest.raises(AttributeError):
    config.train.batchsize = 4  # Locked: unknown keys fail.


def test_bfloat16_compute_with_remat_keeps_float32_params():
  config = tiny_train_config(decoder="mlseg")
  config.model.dtype = "bfloat16"
  config.model.remat = True
  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:2])
  _, mesh, state, _, step_fn = train.setup(config, mesh)
  state, metrics = step_fn(state, train.global_batch(next(random_batches(4)), mesh))
  assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
  assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(state.opt_state)
             if hasattr(m, "dtype") and m.ndim)


def test_a_diverged_run_stops_at_its_log_step_and_keeps_the_checkpoints_as_they_were(tmp_path):
  config = tiny_train_config(total_steps=10, log_every=5, checkpoint_every=5)

  def batches_turning_nan():
    for i, batch in enumerate(random_batches(seed=1)):
      if i == 6:  # Step 7.
        batch["image"][:] = np.nan
      yield batch

  with pytest.raises(train.NonFiniteLoss, match="the loss is nan at step 7"):
    train.train(config, tmp_path, data_iter=batches_turning_nan())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]


def test_the_compiled_step_reports_its_flops_and_memory():
  def report(batch_size):
    config = tiny_train_config(batch_size=batch_size)
    _, mesh, state, _, step_fn = train.setup(config)
    batch = train.global_batch(next(random_batches(batch=batch_size)), mesh)
    line = train.describe_compiled_step(step_fn, state, batch)
    state, metrics = step_fn(state, batch)  # The executable is reused, its inputs intact.
    assert np.isfinite(float(metrics["loss"]))
    return line

  line, double = report(8), report(16)
  assert "arguments" in line and "temporaries" in line, line
  # Per device: 1 crop at batch 8, 2 at batch 16 (plus the batch-independent update).
  ratio = float(double.split(" GFLOP")[0]) / float(line.split(" GFLOP")[0])
  assert 1.7 < ratio < 2.1, (line, double)


def test_resuming_with_another_model_names_the_parameters_and_keeps_the_checkpoint(tmp_path):
  from mlseg_jax import errors

  config = tiny_train_config("mlseg", total_steps=2, checkpoint_every=2)
  train.train(config, tmp_path, data_iter=random_batches())
  other = tiny_train_config("mlseg", total_steps=4, checkpoint_every=2)
  other.model.topk = 3  # The run's k is 4: MLSeg's mask norm is over k rank slots.
  with pytest.raises(errors.CheckpointError,
                     match=r"checkpoints/2 was written for another model than the config's: "
                           r"decode_head/mask_norm/bias: checkpoint \(4,\), model \(3,\)"):
    train.train(other, tmp_path, data_iter=random_batches())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert not (tmp_path / "damaged_checkpoints").exists()


def test_the_log_lines_give_the_eta_and_the_summary_line_the_dataset_size(tmp_path, caplog):
  import logging as python_logging
  import re

  caplog.set_level(python_logging.INFO)
  config = tiny_train_config(total_steps=4, log_every=2, checkpoint_every=4)
  config.data.photometric = False
  train.train(config, tmp_path)  # The config's own pipeline: 32 CamVid subset records.
  lines = [r.getMessage() for r in caplog.records]
  (summary,) = [line for line in lines if line.startswith("train step of")]
  assert "on 32 training records" in summary, summary
  assert f"devices: {jax.devices()[0].device_kind};" in summary, summary
  steps = [line for line in lines if re.match(r"step \d+/4 ", line)]
  assert len(steps) == 2, lines
  assert re.match(r"step 2/4 eta=\d+:\d\d:\d\d \w+=", steps[0]), steps[0]
  assert steps[1].startswith("step 4/4 eta=0:00:00 "), steps[1]


def test_log_lines_are_written_above_the_progress_bar(tmp_path, monkeypatch, caplog):
  import io
  import logging as python_logging

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  root = python_logging.getLogger()
  handler = python_logging.StreamHandler(terminal)
  root.addHandler(handler)
  caplog.set_level(python_logging.INFO)  # Whatever earlier tests set (setLevel: uncached).
  caplog.set_level(python_logging.INFO, logger="absl")
  try:
    progress = train.Progress(tmp_path, 4, 0, 2, 8, is_main=True)
    assert progress.bar is not None
    for step in range(1, 5):
      progress.update(step, {"loss": jnp.float32(1.0 / step), "lr": jnp.float32(0.1)})
    progress.close()
    assert handler in root.handlers  # The handlers are the logger's own again.
  finally:
    root.removeHandler(handler)
  out = terminal.getvalue()
  assert "step 2/4 eta=" in out and "step 4/4 eta=0:00:00" in out, out
  for line in ("step 2/4", "step 4/4"):
    i = out.index(line)
    # The bar's line was cleared first ("\r" + blanks + "\r"), not written on.
    assert out[:i].endswith("\r"), repr(out[max(i - 80, 0):i + 20])
  assert "2/4" in out.replace("step 2/4", "")  # The bar itself was drawn.


def test_evaluations_json_is_whole_or_the_previous_one(tmp_path, monkeypatch):
  # A disk that fills while the file is written leaves the previous file, which the rerun
  # reads; a step forgotten (its checkpoint failed) is no longer the best.
  import errno
  import json

  from etils import epath

  from mlseg_jax import errors

  workdir, checkpoints = epath.Path(tmp_path), epath.Path(tmp_path) / "checkpoints"
  evaluations = train.Evaluations(workdir, "mIoU")
  evaluations.add(2, {"ss/mIoU": 0.5}, checkpoints)
  evaluations.add(4, {"ss/mIoU": 0.7}, checkpoints)
  assert evaluations.best_step == 4
  evaluations.forget(4, checkpoints)
  assert train.Evaluations(workdir, "mIoU").best_step == 2
  before = (tmp_path / "evaluations.json").read_text()

  write_text = type(workdir).write_text

  def half_then_full(self, text, *args, **kwargs):
    write_text(self, text[:len(text) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self))

  monkeypatch.setattr(type(workdir), "write_text", half_then_full)
  with pytest.raises(errors.FilesystemError) as raised:
    evaluations.add(6, {"ss/mIoU": 0.9}, checkpoints)
  assert str(raised.value) == f"{tmp_path / 'evaluations.json'}: no space left on device"
  assert (tmp_path / "evaluations.json").read_text() == before
  assert json.loads(before)["best"]["step"] == 2
