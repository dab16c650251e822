"""The quickstart model trained, checkpointed, evaluated and resumed by 2 processes x 4 CPU
devices (a real jax.distributed run on loopback) equals the 1 process x 8 devices run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from mlseg_jax import pretrained
from mlseg_jax.convert import flatten

# A small, dropout-free quickstart: with dropout the masks follow batch positions, and the
# two layouts place the same records at different positions of the global batch.
OVERRIDES = [
    "--config.model.backbone_depth=2", "--config.model.dropout=0.0",
    "--config.model.drop_path_rate=0.0", "--config.data.crop_size=(64,64)",
    "--config.data.img_scale=(120,90)", "--config.data.test_scale=(120,90)",
    "--config.eval.stride=(64,64)", "--config.eval.max_images=6", "--config.train.log_every=2",
    "--config.train.checkpoint_every=2", "--config.data.photometric=True",
    # SGD: Adam divides by the gradients' own size, which turns float summation-order
    # noise in near-zero gradients into visible parameter differences.
    "--config.optim.name=sgd", "--config.optim.lr=0.01", "--config.optim.warmup_steps=0",
    # A constant rate (poly decay of power 0): a run to 6 steps takes the steps of one to 4.
    "--config.optim.power=0.0",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(workdir, steps, processes):
  args = [sys.executable, "-m", "mlseg_jax.main", "--config", str(REPO / "configs/quickstart.py"),
          "--workdir", str(workdir), f"--config.train.total_steps={steps}",
          "--config.train.eval_every=4", *OVERRIDES]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for k in ("MLSEG_COORDINATOR", "MLSEG_NUM_PROCESSES", "MLSEG_PROCESS_ID", "SLURM_JOB_ID"):
    env.pop(k, None)
  if processes == 1:
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
  else:
    port = _free_port()
    procs = []
    for pid in range(processes):
      penv = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
                  MLSEG_COORDINATOR=f"127.0.0.1:{port}", MLSEG_NUM_PROCESSES=str(processes),
                  MLSEG_PROCESS_ID=str(pid))
      procs.append(subprocess.Popen(args, cwd=REPO, env=penv, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _results(workdir, step):
  ev = json.loads((workdir / "eval" / f"step_{step}_ss.json").read_text())
  params = flatten(pretrained.load_params(workdir / "checkpoints" / str(step)))
  return ev, params


def _assert_same(a, b):
  (ea, pa), (eb, pb) = a, b
  for key in ("mIoU", "aAcc", "mAcc"):
    np.testing.assert_allclose(ea[key], eb[key], atol=1e-6)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6, err_msg="/".join(k))


@pytest.mark.slow
def test_two_processes_train_checkpoint_evaluate_and_resume_like_one(tmp_path):
  metrics = {}
  # One process straight to step 6 (evaluated at 4 and at the end); two processes to 4,
  # then resumed to 6 from the checkpoint at 4.
  one, two = tmp_path / "one", tmp_path / "two"
  _run(one, 6, processes=1)
  out = _run(two, 4, processes=2)
  # Only process 0 logs training progress and writes TensorBoard.
  assert "step 4/4" in out[0] and "step 4/4" not in out[1]
  _assert_same(_results(one, 4), _results(two, 4))
  assert not (two / "tensorboard").exists() or len(list((two / "tensorboard").iterdir())) == 1
  out = _run(two, 6, processes=2)
  assert "resumed from" in out[0] and "at step 4" in out[0], out[0][-3000:]
  _assert_same(_results(one, 6), _results(two, 6))
  for name in ("one", "two"):
    metrics[name] = json.loads((tmp_path / name / "train_metrics.json").read_text())
  for key in ("loss", "loss_seg", "loss_img"):
    np.testing.assert_allclose(metrics["one"][key], metrics["two"][key], rtol=1e-4)
