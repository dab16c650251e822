"""Preemption on a pod: two processes x 4 CPU devices, a signal to one or to both at
different steps, and every process stops at the same step with one complete checkpoint
(its own file, so that the test runner can run it beside tests/test_preemption.py)."""

import re
import signal
import socket

import pytest

from mlseg_jax import preemption
from test_preemption import Run, _command, _env, _saved_steps


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, total):
  port = _free_port()
  return [Run(_command(workdir, total, "--config.train.checkpoint_every=1000",
                       f"--config.train.eval_every={total}"),
              _env(devices=4, MLSEG_COORDINATOR=f"127.0.0.1:{port}",
                   MLSEG_NUM_PROCESSES="2", MLSEG_PROCESS_ID=str(pid)))
          for pid in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("who", ["one process", "both, at different steps"])
def test_two_processes_stop_at_one_step_with_one_complete_checkpoint(tmp_path, who):
  total = 30
  procs = _two_processes(tmp_path, total)
  try:
    assert procs[0].wait_for(r"step 3/"), procs[0].output[-3000:]
    if who == "one process":
      procs[1].proc.send_signal(signal.SIGTERM)
    else:
      procs[0].proc.send_signal(signal.SIGTERM)
      # The next step (unless the agreement was quicker), then the other process.
      procs[0].wait_for(r"step [4-9]/|stopped at step")
      if procs[1].proc.poll() is None:
        procs[1].proc.send_signal(signal.SIGINT)
    rcs = [p.wait(120) for p in procs]
  finally:
    for p in procs:
      if p.proc.poll() is None:
        p.proc.kill()
  outputs = [p.output for p in procs]
  assert rcs == [preemption.EXIT_CODE] * 2, [o[-3000:] for o in outputs]
  steps = {int(re.search(r"stopped at step (\d+)", o).group(1)) for o in outputs}
  assert len(steps) == 1, steps
  (step,) = steps
  assert 3 <= step < total and _saved_steps(tmp_path) == [step]
  # One process of 8 devices resumes it and finishes.
  resumed = Run(_command(tmp_path, total, "--config.train.checkpoint_every=1000",
                         f"--config.train.eval_every={total}"), _env())
  assert resumed.wait(600) == 0, resumed.output[-3000:]
  assert f"at step {step}" in resumed.output
  assert (tmp_path / "eval" / f"step_{total}_ss.json").exists()
