"""A full disk, a read-only folder, a workdir that is a file: each ends in one `error:` line
naming the path and the cause, exit code 2, and a full disk loses no checkpoint.

Where this machine lets the test mount them, the filesystems are real (a small tmpfs that
fills, a read-only bind mount); everywhere, a save whose array writes fail with ENOSPC
(Orbax's lowest Python write, `async_serialize_from_host`, patched in the training process)
tests the same path: the run stops before another step, the partial step is cleared away,
the last complete checkpoint is named and a rerun resumes from it.
"""

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, TrainedQuickstart
from mlseg_jax import errors
from mlseg_jax import export
from mlseg_jax import paths

IMAGES = REPO / "data" / "camvid_subset" / "images" / "val"
# The tiny quickstart with a checkpoint every 2 steps and every step logged; the 2nd
# checkpoint (step 4) is the one that fails.
STEPS, EVERY, FAILS_AT = 6, 2, 4
TRAINING = ["--config", "configs/quickstart.py", *TINY, "--config.train.log_every=1",
            f"--config.train.checkpoint_every={EVERY}", f"--config.train.total_steps={STEPS}",
            "--config.train.eval_every=100", "--config.eval.max_images=1"]

# The training process with its checkpoint array writes failing, for step FAIL_STEP only,
# as a full disk fails them (run as `python -c`, then the command line as usual).
# With TENSORBOARD_TOO set, the disk is full for TensorBoard as well from that save on, and
# the save's failure waits until TensorBoard has met it: the order a real full disk gives
# when the next step's scalars are written before the background save fails.
_FULL_DISK = r"""
import asyncio, errno, json, os, re, runpy, sys, threading
from orbax.checkpoint._src.serialization import serialization
write, step = serialization.async_serialize_from_host, os.environ["FAIL_STEP"]
started, refused = threading.Event(), threading.Event()
async def full_disk(replica_slices, spec, *args, **kwargs):
  text = json.dumps(spec, default=str)
  where = re.search(r"[^\"']*/" + step + r"\.orbax-checkpoint-tmp[^\"']*", text)
  if where:
    started.set()
    if os.environ.get("TENSORBOARD_TOO"):
      await asyncio.to_thread(refused.wait, 120)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where.group(0))
  return await write(replica_slices, spec, *args, **kwargs)
serialization.async_serialize_from_host = full_disk
if os.environ.get("TENSORBOARD_TOO"):
  from tensorboardX import event_file_writer
  flush = event_file_writer.EventsWriter.flush
  def full(self):
    if not started.is_set():
      return flush(self)
    refused.set()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  event_file_writer.EventsWriter.flush = full
sys.argv[0] = "mlseg_jax.main"
runpy.run_module("mlseg_jax.main", run_name="__main__", alter_sys=True)
"""


# TensorBoard's scalars written to DIRECTORY until the disk refuses them: "full" fills the
# disk DIRECTORY is on first, "inject" makes tensorboardX's flush fail as a full disk does.
_TENSORBOARD = r"""
import errno, os, sys
from mlseg_jax import errors, tracking
from mlseg_jax.tensorboard import open_summary_writer

def main(argv):
  directory, how = argv[1:]
  tracker = tracking.Tracker(open_summary_writer(directory))
  if how == "inject":
    from tensorboardX import event_file_writer
    def full(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    event_file_writer.EventsWriter.flush = full
  else:
    try:
      with open(os.path.join(directory, "..", "filler"), "wb") as f:
        while True:
          f.write(b"x" * 4096)
          f.flush()
    except OSError:
      pass
  try:
    for step in range(10000):
      tracker.scalars(step, {"loss_with_a_long_name_" * 8: 1.0}, prefix="train")
  finally:
    tracker.close()

errors.run(main)
"""


def _run(*args, module="mlseg_jax.main", fail_step=None, tensorboard_too=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  command = [sys.executable, "-m", module]
  if fail_step is not None:
    env["FAIL_STEP"] = str(fail_step)
    if tensorboard_too:
      env["TENSORBOARD_TOO"] = "1"
    command = [sys.executable, "-c", _FULL_DISK]
  return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _one_error_line(proc, *needles) -> str:
  """Exit 2, exactly one `error:` line, holding every needle, and no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, \
      proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _last_logged_step(stderr: str) -> int:
  return int(re.findall(rf"step (\d+)/{STEPS} eta", stderr)[-1])


def _assert_stopped_at_last_complete_checkpoint(proc, workdir, *, synchronous: bool):
  """The run stopped before the next checkpoint, naming the failed step, the cause and the
  last complete checkpoint, which is all that is left in checkpoints/."""
  checkpoints = workdir / "checkpoints"
  line = _one_error_line(proc, f"checkpoint step {FAILS_AT} could not be written to "
                         f"{checkpoints}/{FAILS_AT}", "no space left on device",
                         f"the last complete checkpoint is step {FAILS_AT - EVERY} "
                         f"({checkpoints}/{FAILS_AT - EVERY})")
  stopped = int(re.search(r"training stopped at step (\d+)", line).group(1))
  assert _last_logged_step(proc.stderr) == stopped
  # No step after a synchronous save that failed. A background one is written while the
  # next steps run; none starts once it has failed, and the next checkpoint waits for it.
  assert stopped == FAILS_AT if synchronous else FAILS_AT <= stopped <= FAILS_AT + EVERY
  assert sorted(p.name for p in checkpoints.iterdir()) == [str(FAILS_AT - EVERY)]


def _resumes(workdir):
  """A rerun restores the last complete checkpoint and trains on (one step, to be quick)."""
  last = FAILS_AT - EVERY
  proc = _run(*TRAINING, f"--config.train.total_steps={last + 1}", "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints'} at step {last}" in proc.stderr
  assert (workdir / "checkpoints" / str(last + 1)).is_dir()


# ---------------------------------------------------------------------------------------
# Real filesystems, where this machine lets the test mount them.


def _mount(*args):
  proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
  return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 26 MB tmpfs: room for one checkpoint of the tiny quickstart (17 MB), not two."""
  where = tmp_path / "tmpfs"
  where.mkdir()
  ok, why = _mount("-t", "tmpfs", "-o", "size=26m", "tmpfs", where)
  if not ok:
    pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs: {why}); the fault-injected "
                "tests cover the same path")
  yield where
  subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_folder(tmp_path):
  """An empty folder on a read-only bind mount."""
  source, where = tmp_path / "ro_source", tmp_path / "ro"
  source.mkdir()
  where.mkdir()
  ok, why = _mount("--bind", source, where)
  if ok:
    ok, why = _mount("-o", "remount,bind,ro", where)
    if not ok:
      subprocess.run(["umount", "-l", str(where)], check=False)
  if not ok:
    pytest.skip(f"cannot make a read-only bind mount here (mount: {why})")
  yield where
  subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_training_at_its_last_complete_checkpoint(small_tmpfs):
  workdir = small_tmpfs / "run"
  proc = _run(*TRAINING, "--workdir", workdir)
  _assert_stopped_at_last_complete_checkpoint(proc, workdir, synchronous=False)
  # Intact on the full disk: it reads back (here the parameters, as eval and export read
  # them; the rerun that resumes the whole state is the fault-injected test's).
  _, source = export.load_params(export.export_config(None, workdir), workdir)
  assert source == f"{workdir / 'checkpoints'}/{FAILS_AT - EVERY}"


def test_tensorboard_on_a_full_disk_is_one_line(small_tmpfs):
  directory = small_tmpfs / "run" / "tensorboard"
  proc = subprocess.run([sys.executable, "-c", _TENSORBOARD, directory, "full"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  _one_error_line(proc, f"{directory}: no space left on device")


def test_a_read_only_workdir_is_refused_before_training(read_only_folder):
  workdir = read_only_folder / "run"
  proc = _run(*TRAINING, "--workdir", workdir)
  _one_error_line(proc, f"--workdir {workdir}", "read-only file system")
  assert "train step" not in proc.stderr


def test_predict_and_export_into_a_read_only_folder(read_only_folder, trained_quickstart):
  output = read_only_folder / "pictures"
  proc = _run("--mode", "predict", "--workdir", trained_quickstart.workdir, "--images",
              IMAGES, "--output", output)
  _one_error_line(proc, f"--output {output}", "read-only file system")
  proc = _run("--workdir", trained_quickstart.workdir, "--format", "stablehlo", "--output",
              read_only_folder / "m.stablehlo", module="mlseg_jax.export")
  _one_error_line(proc, f"{read_only_folder}", "read-only file system")


# ---------------------------------------------------------------------------------------
# Everywhere: a save that fails as a full disk fails it, and paths that are not folders.


@pytest.mark.parametrize("background", [True, False], ids=["async_save", "sync_save"])
def test_a_failed_save_stops_training_and_the_rerun_resumes(tmp_path, background):
  workdir = tmp_path / "run"
  # Step FAILS_AT is evaluated too: in the background its save fails after the evaluation.
  proc = _run(*TRAINING, f"--config.train.async_checkpoints={background}",
              f"--config.train.eval_every={FAILS_AT}", "--workdir", workdir,
              fail_step=FAILS_AT)
  _assert_stopped_at_last_complete_checkpoint(proc, workdir, synchronous=not background)
  # No evaluation, nor "best", of a checkpoint that is not there.
  evaluations = workdir / "evaluations.json"
  if background:
    assert f"evaluating step {FAILS_AT}" in proc.stderr
  if evaluations.exists():
    data = json.loads(evaluations.read_text())
    assert str(FAILS_AT) not in data["steps"] and "best" not in data, data
  if background:  # The same checkpoint either way; one resume shows it restores.
    _resumes(workdir)


def test_a_full_disk_met_first_by_tensorboard_ends_in_the_checkpoints_line(tmp_path):
  # TensorBoard's refusal stops the step; the save in flight, failed too, names what is lost.
  workdir = tmp_path / "run"
  proc = _run(*TRAINING, "--workdir", workdir, fail_step=FAILS_AT, tensorboard_too=True)
  _assert_stopped_at_last_complete_checkpoint(proc, workdir, synchronous=False)
  assert "could not save the interrupted state" not in proc.stderr


def test_tensorboard_that_cannot_flush_is_one_line(tmp_path):
  directory = tmp_path / "tensorboard"
  proc = subprocess.run([sys.executable, "-c", _TENSORBOARD, directory, "inject"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  _one_error_line(proc, f"{directory}: no space left on device")


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  proc = _run(*TRAINING, "--workdir", afile)
  _one_error_line(proc, f"--workdir {afile} is a file, not a directory")
  with pytest.raises(errors.UserError, match=f"{afile} is a file"):
    paths.writable_directory(afile / "run")


def test_export_creates_its_output_folder(tmp_path, trained_quickstart: TrainedQuickstart):
  output = tmp_path / "not" / "yet" / "m.stablehlo"
  export.export(None, trained_quickstart.workdir, "stablehlo", output)
  assert output.is_file() and output.with_name("m.stablehlo.json").is_file()


def test_a_refused_write_is_one_line_naming_its_path(tmp_path, monkeypatch):
  """The one translation: an OSError's errno, or TensorStore's text of one (Orbax's
  writes), wherever in the chain of causes, as "PATH: REASON"."""
  ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run/tensorboard")
  assert str(errors.filesystem_error(ro)) == "/ro/run/tensorboard: read-only file system"
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
      '"/full/run/checkpoints/4.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
      '"/full/run/checkpoints/4.orbax-checkpoint-tmp/ocdbt.process_0/d/ab": Failed to write '
      "7127040 bytes to file 7: No space left on device [os_error_code='28']")
  assert errors.filesystem_error(RuntimeError("not a filesystem's")) is None
  try:
    raise RuntimeError("commit failed") from tensorstore
  except RuntimeError as e:
    found = errors.filesystem_error(e)
  assert found.errno == errno.ENOSPC and str(found) == (
      "/full/run/checkpoints/4.orbax-checkpoint-tmp/ocdbt.process_0/d/ab: no space left on "
      "device")
  # A failed write() names no file: `writing` names the one being written.
  with pytest.raises(errors.FilesystemError, match="^/w/eval: no space left on device$"):
    with errors.writing("/w/eval"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with pytest.raises(KeyError):  # Anything else passes through as it is.
    with errors.writing("/w/eval"):
      raise KeyError("x")

  # The workdir check, on a folder whose writes fail as a read-only one's do.
  def read_only(self, data):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(self))

  monkeypatch.setattr(type(paths.absolute_path(tmp_path)), "write_bytes", read_only)
  with pytest.raises(errors.FilesystemError,
                     match=f"^--output {tmp_path}/out: read-only file system$"):
    paths.writable_directory(tmp_path / "out", "--output")
