"""Where a run's numbers and pictures go: TensorBoard always, Weights & Biases on request.

A `Tracker` takes scalars (`scalars(step, {...}, prefix)`) and RGB pictures (`images(step,
{tag: (H, W, 3) uint8})`) and hands them to a tensorboardX writer and, with
`config.logging.wandb`, to a W&B run under the same names (`train/loss`, `eval/ss/mIoU`,
`eval/ss/confusion`, ...). Only the main process tracks; elsewhere `open_tracker` returns
one that drops everything.

W&B: `import wandb` happens only when `logging.wandb` is set, and its absence is one line
naming `pip install wandb`. `logging.wandb_mode="offline"` needs no network (`wandb sync
DIR` uploads later). A training run keeps its W&B id in WORKDIR/wandb_run_id, so a resumed
run (after a preemption, say) continues the same W&B run. The run's files go to
$WANDB_DIR when set, else to the workdir (local workdirs; a bucket's run uses wandb's
default, ./wandb).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from mlseg_jax import errors
from mlseg_jax.paths import is_remote

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


def default_logging_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Images sent to TensorBoard (and W&B) at every evaluation: this many validation images,
  # ground truth beside the prediction with a legend, plus the confusion matrix and the
  # per-class IoU charts (--mode predict: this many of its pictures); 0 sends none. The
  # charts are written to WORKDIR/eval/ whatever this is.
  c.tensorboard_images = 0
  c.wandb = False  # Also log to Weights & Biases (pip install wandb).
  c.wandb_project = "mlseg_jax"
  c.wandb_name = ""  # "": the workdir's name.
  c.wandb_tags = ()
  c.wandb_mode = "online"  # "offline": written locally, no network; "disabled": nothing.
  return c


def logging_problems(c: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the `logging` fields, one line each (`configs/validate.py`)."""
  problems = []
  n = c.tensorboard_images
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    problems.append(f"logging.tensorboard_images={n!r} must be 0 or a positive integer")
  if c.wandb_mode not in WANDB_MODES:
    problems.append(f"logging.wandb_mode={c.wandb_mode!r} must be one of {WANDB_MODES}")
  if c.wandb and not c.wandb_project:
    problems.append("logging.wandb_project is empty: W&B files every run under a project")
  if isinstance(c.wandb_tags, str) or not all(isinstance(t, str) for t in c.wandb_tags):
    problems.append(f"logging.wandb_tags={c.wandb_tags!r} must be a tuple of strings, e.g. "
                    "'(\"ade20k\",\"mlseg\")'")
  return problems


class Tracker:
  """Scalars and images to a TensorBoard writer and a W&B run, either of which may be None."""

  def __init__(self, writer=None, wandb_run=None):
    self.writer, self.wandb_run = writer, wandb_run

  def scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
    named = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in scalars.items()}
    if self.writer is not None:
      def write(writer):
        for k, v in named.items():
          writer.add_scalar(k, v, step)
        writer.flush()

      self._to_writer(write)
    if self.wandb_run is not None:
      self.wandb_run.log(named, step=int(step))

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """images: tag -> (H, W, 3) uint8."""
    if not images:
      return
    if self.writer is not None:
      def write(writer):
        for tag, pixels in images.items():
          writer.add_image(tag, np.asarray(pixels, np.uint8), step, dataformats="HWC")
        writer.flush()

      self._to_writer(write)
    if self.wandb_run is not None:
      import wandb

      self.wandb_run.log({tag: wandb.Image(np.asarray(pixels, np.uint8))
                          for tag, pixels in images.items()}, step=int(step))

  def close(self, timeout: float = 30.0) -> None:
    """Within `timeout` s each: a stop after a signal must not hang on a bucket or network."""
    from mlseg_jax import preemption

    if self.writer is not None:
      if not preemption.call_with_timeout(self.writer.close, timeout, "TensorBoard writer"):
        _give_up(self.writer)
      self.writer = None
    if self.wandb_run is not None:
      preemption.call_with_timeout(self.wandb_run.finish, timeout, "W&B run")
      self.wandb_run = None

  def _to_writer(self, write) -> None:
    """write(writer), where a full or read-only disk is one line naming the event folder;
    the writer is then given up (else its thread and its exit hook retry, each with a
    traceback)."""
    try:
      write(self.writer)
    except Exception as e:
      where = getattr(self.writer, "_remote", None) or getattr(self.writer, "logdir", None)
      translated = errors.filesystem_error(e, path=where)
      if translated is None:
        raise
      _give_up(self.writer)
      self.writer = None
      raise translated from e


def _give_up(writer) -> None:
  """Stops a tensorboardX writer whose writes failed, writing nothing more: its event files
  marked closed (its exit hook would flush them again), its thread ended (at exit it would
  die with a traceback). tensorboardX has no call for this."""
  for file_writer in (getattr(writer, "all_writers", None) or {}).values():
    event_writer = getattr(file_writer, "event_writer", None)
    if event_writer is None:
      continue
    event_writer._closed = True
    worker = getattr(event_writer, "_worker", None)
    if worker is not None and worker.is_alive():
      # The events still queued (up to 10) go nowhere: else they hold the queue full, the
      # stop signal cannot get in, and the thread, left alive, dies at exit on the closed
      # queue with a traceback.
      worker._record_writer = _Discard()
      try:
        event_writer._event_queue.put(worker._shutdown_signal, timeout=5)
        worker.join(timeout=5)
      except Exception:  # noqa: BLE001  (a queue still full: the daemon dies with us)
        pass


class _Discard:
  """An event writer that writes nothing: for a worker thread given up."""

  def write_event(self, event):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def open_tracker(config: ml_collections.ConfigDict, workdir, *, job_type: str = "train",
                 tensorboard_dir=None) -> Tracker:
  """The main process's tracker for a `job_type` ("train", "eval", "predict") run:
  TensorBoard in `tensorboard_dir` (default WORKDIR/tensorboard), W&B with logging.wandb.
  Other processes get one that drops everything."""
  from mlseg_jax import distributed
  from mlseg_jax.tensorboard import open_summary_writer

  if not distributed.is_main_process():
    return Tracker()
  c = config.get("logging") or default_logging_config()
  run = start_wandb(c, config, workdir, job_type) if c.wandb else None  # May refuse: first.
  writer = open_summary_writer(tensorboard_dir or epath.Path(workdir) / "tensorboard")
  return Tracker(writer, run)


def import_wandb():
  try:
    import wandb
  except ImportError:
    raise errors.ConfigError("logging.wandb=True needs Weights & Biases, which is not "
                             "installed: pip install wandb") from None
  return wandb


def start_wandb(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir,
                job_type: str) -> Any:
  """A W&B run for this command (`wandb.init`), resuming a training run's own id."""
  wandb = import_wandb()
  workdir = epath.Path(workdir) if workdir else None
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)  # Training's first call: nothing there yet.
  name = c.wandb_name or (workdir.name if workdir else None)
  kwargs = dict(project=c.wandb_project, name=name, group=name, tags=list(c.wandb_tags),
                mode=c.wandb_mode, job_type=job_type, config=_plain(config.to_dict()))
  if workdir is not None and not os.environ.get("WANDB_DIR") and not is_remote(workdir):
    kwargs["dir"] = os.fspath(workdir)
  id_file = workdir / WANDB_ID_FILE if workdir is not None and job_type == "train" else None
  if id_file is not None and id_file.exists():
    kwargs.update(id=id_file.read_text().strip(), resume="allow")
  run = wandb.init(**kwargs)
  if id_file is not None and c.wandb_mode != "disabled":
    id_file.write_text(run.id + "\n")
  return run


def _plain(x):
  """A config's values as W&B stores them (lists for tuples)."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x
