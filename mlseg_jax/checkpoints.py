"""Orbax checkpoints of training: the manager (the last N steps and the best one), save and
restore onto any mesh and any number of processes (the whole state to resume, the parameters
alone to evaluate), the fall-back past a checkpoint that does not read back, and what is left
of a save that failed (a full disk): its error, and its partial step cleared away.

A step's checkpoint holds `state` (the TrainState: params, optimizer state, step, RNG)
and, when the input pipeline is a Grain iterator, `data` (its position).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as pylogging
import os
import re
import sys
import time
import warnings
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mlseg_jax import data as data_lib
from mlseg_jax import distributed
from mlseg_jax import errors
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax.paths import absolute_path


DAMAGED_DIR = "damaged_checkpoints"  # Checkpoints that did not read back, kept for a look.
# Where Orbax writes a step before it is complete (renamed to STEP when it is).
PARTIAL_SUFFIX = ".orbax-checkpoint-tmp"


class _KeepStep:
  """Orbax preservation policy: keep the step `step_fn()` names (the best one), if any."""

  def __init__(self, step_fn: Callable[[], Optional[int]]):
    self.step_fn = step_fn

  def should_preserve(self, checkpoints, *, context):
    del context
    keep = self.step_fn()
    return [info.step == keep for info in checkpoints]


def checkpoint_manager(workdir, config, keep_step: Optional[Callable[[], Optional[int]]] = None
                       ) -> ocp.CheckpointManager:
  """The last `train.keep_checkpoints` steps, and the step `keep_step()` names besides."""
  policies = [ocp.checkpoint_managers.LatestN(n=config.train.keep_checkpoints)]
  if keep_step is not None:
    policies.append(_KeepStep(keep_step))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=config.train.async_checkpoints,
      create=True)
  # A save that fails is reported once, by `save_error`'s caller: not by every thread of
  # Orbax's with its traceback, nor by each of TensorStore's abandoned writes.
  _drop_abandoned_io_errors()
  _quiet_failed_saves()
  directory = absolute_path(workdir) / "checkpoints"
  with errors.writing(directory):
    return ocp.CheckpointManager(directory, options=options)


def with_shardings(abstract, shardings):
  """Shape-only `abstract` laid out by `shardings`: what a restore fills."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def save_checkpoint(mngr, state, data_iter=None, *, force=False):
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = data_lib.checkpoint_args(data_iter)
  return mngr.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def save_error(mngr, wait: bool = False) -> Optional[Exception]:
  """The error of the last save, once it has ended: None while it is still being written
  in the background (unless `wait`), when it succeeded, or when this was asked before.
  A save that failed is not in `mngr.all_steps()` (Orbax dropped it); its partial files
  are, until `discard_failed_save`."""
  if not wait and mngr.is_saving_in_progress():
    return None
  try:
    mngr.wait_until_finished()  # Ended: returns at once, or raises how it failed.
  except Exception as e:  # noqa: BLE001  (the caller reports it, whatever it is)
    return e
  return None


def discard_failed_save(mngr, step: int) -> None:
  """Clears away what a failed save of `step` left: Orbax's partial directory is deleted
  (on a full disk its space is what the next save needs), and a step directory that got
  its final name is moved to WORKDIR/damaged_checkpoints, as `restore_latest` moves one
  that does not read back. The latest complete step is then what a resume finds."""
  directory = epath.Path(mngr.directory)
  if jax.process_index() == 0:
    for partial in directory.glob(f"{step}{PARTIAL_SUFFIX}*"):
      partial.rmtree(missing_ok=True)
  distributed.sync(f"discard_failed_save_{step}")
  if (directory / str(step)).exists():
    _move_aside(mngr, step)
  gc.collect()  # The failed writes' coroutines, now, rather than at exit.
  mngr.reload()


def check_shapes(mngr, step: int, target, what: str = "state") -> None:
  """Raises `errors.CheckpointError` naming every parameter whose stored shape differs from
  the model's (or that only one of them has): a config that is not the run's, which must
  not be mistaken for a damaged checkpoint."""
  stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(mngr.directory) / str(step) / what)
  stored, wanted = _shapes(getattr(stored, "tree", stored)), _shapes(target)
  if what == "state":
    stored = {k: v for k, v in stored.items() if k[0] == "params"}
    wanted = {k: v for k, v in wanted.items() if k[0] == "params"}
  problems = []
  for key in sorted(set(stored) | set(wanted)):
    name = "/".join(key[1:] if key[0] == "params" else key)
    if key not in stored:
      problems.append(f"{name}: not in the checkpoint, model {wanted[key]}")
    elif key not in wanted:
      problems.append(f"{name}: checkpoint {stored[key]}, not in the model")
    elif stored[key] != wanted[key]:
      problems.append(f"{name}: checkpoint {stored[key]}, model {wanted[key]}")
  if problems:
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    raise errors.CheckpointError(
        f"{mngr.directory}/{step} was written for another model than the config's: "
        + "; ".join(problems[:8]) + more)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of a state, a parameter tree or Orbax's metadata of one."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
          tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def restore_checkpoint(mngr, state, shardings, data_iter=None, step=None):
  """Restores onto `shardings`, whatever mesh and number of processes wrote it."""
  step = mngr.latest_step() if step is None else step
  check_shapes(mngr, step, state)
  items = {"state": ocp.args.StandardRestore(with_shardings(state, shardings))}
  data_state = None
  if data_iter is not None:
    data_state = _data_state_from_other_process_count(epath.Path(mngr.directory) / str(step))
    if data_state is None:
      items["data"] = data_lib.checkpoint_args(data_iter, restore=True)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if data_state is not None:
    data_iter.set_state(data_state)
  return restored["state"]


def _data_state_from_other_process_count(step_dir: epath.Path):
  """The input position saved by a run with another number of processes, or None.

  Grain writes one file per process (process_P-of-N.json). Every process of the training
  stream stands at the same batch index (it reads positions p, p + N, ... of one global
  stream, and batch i of all processes together is global batch i whatever N is), so any
  process count can continue from that index.
  """
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  data_dir = step_dir / "data"
  if not data_dir.exists() or (data_dir / name).exists():
    return None
  saved = sorted(data_dir.glob("process_*-of-*.json"))
  states = {f.read_text() for f in saved}
  if len(states) != 1:
    raise ValueError(f"{data_dir}: the input position was saved by {len(saved)} processes "
                     f"at different positions; it cannot continue on "
                     f"{jax.process_count()} processes")
  return json.loads(states.pop())


def restore_latest(mngr, state, shardings, data_iter=None):
  """(state, step) of the newest checkpoint that reads back on every process, or
  (None, None) when there is none.

  One that does not read back (truncated files, missing metadata) is reported in one line
  naming its step and the reason, moved to WORKDIR/damaged_checkpoints/STEP (kept, not
  deleted), and the one before it is tried.
  """
  return _newest_that_reads_back(
      mngr, lambda step: restore_checkpoint(mngr, state, shardings, data_iter, step=step))


def restore_params(mngr, params, shardings):
  """(params, step) of the newest checkpoint that reads back, or (None, None); only the
  `params` of its state are read (an Orbax partial restore), so no optimizer is needed.
  `params` is the shape-only tree (`abstract_params`), laid out by `shardings`. Falls back
  past a damaged step as `restore_latest` does."""

  def read(step):
    check_shapes(mngr, step, {"params": params})
    target = {"params": with_shardings(params, shardings)}
    state = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(state=state))["state"]["params"]

  return _newest_that_reads_back(mngr, read)


def _newest_that_reads_back(mngr, read: Callable[[int], object]):
  """(read(step), step) for the newest step where `read` succeeds on every process."""
  for step in sorted(mngr.all_steps(), reverse=True):
    error = None
    with _tensorstore_teardown_quiet() as quiet:
      try:
        metadata = epath.Path(mngr.directory) / str(step) / "state" / "_METADATA"
        if not metadata.exists():  # Orbax's own error would be about pytree structure.
          raise FileNotFoundError(f"{metadata} is missing")
        restored = read(step)
      except errors.CheckpointError:
        raise  # Readable, but not this model's: the config is wrong, not the checkpoint.
      except Exception as e:  # noqa: BLE001  (whatever the damage, try the previous step)
        error = e
        _drop_abandoned_io_errors()
        quiet.settle()
    if not failed_on_any_process(error is not None):
      return restored, step
    reason = _one_line(error) if error is not None else "another process could not read it"
    aside = _move_aside(mngr, step)
    logging.error("checkpoint step %d does not read back (%s); moved to %s, trying the "
                  "previous one", step, reason, aside)
    mngr.reload()
  return None, None


def failed_on_any_process(failed: bool) -> bool:
  """`failed` of any process (a collective: every process must ask)."""
  return bool(np.any(metrics_lib.process_allgather(np.asarray(failed))))


def _one_line(error: BaseException) -> str:
  """The innermost cause's first line: the file and what was wrong with it."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 400 else text[:400] + "..."


def _move_aside(mngr, step) -> epath.Path:
  src = epath.Path(mngr.directory) / str(step)
  dst_root = epath.Path(mngr.directory).parent / DAMAGED_DIR
  dst = dst_root / str(step)
  if jax.process_index() == 0:
    dst_root.mkdir(parents=True, exist_ok=True)
    n = 1
    while dst.exists():
      dst, n = dst_root / f"{step}.{n}", n + 1
    src.rename(dst)
  distributed.sync(f"damaged_checkpoint_{step}")
  return dst


def _drop_abandoned_io_errors():
  """From now on, the reads a failed restore abandoned, and the writes of a failed save, die
  quietly: each one's coroutine, whenever it is destroyed, would print its own copy of the
  failure ("Exception ignored in: <coroutine ...>" and a page of TensorStore spec), and
  each of TensorStore's callbacks that completes after Orbax closed its event loop a
  traceback. The failure itself is reported once, by the caller."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return  # A read completing after its restore gave up, as above.
    previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook
  # The same abandoned reads, seen by the warnings module and by asyncio's logger.
  warnings.filterwarnings("ignore", message=r"coroutine '_read_array\w*' was never awaited",
                          category=RuntimeWarning)
  pylogging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


def _quiet_failed_saves():
  """Orbax logs a failed save with its traceback from each of its threads (three or four
  copies); the training reports it in one line (`save_error`), so Orbax's error records of
  a filesystem's refusal (a full disk, a read-only folder) are dropped."""
  logger = pylogging.getLogger("absl")
  if any(isinstance(f, _FailedSaveRecords) for f in logger.filters):
    return
  logger.addFilter(_FailedSaveRecords())


class _FailedSaveRecords(pylogging.Filter):

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno < pylogging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
    return errors.filesystem_error(error) is None


class _TensorstoreTeardownQuiet:
  """Holds back the "Event loop is closed" tracebacks of a failed Orbax read.

  When one array of a restore fails, Orbax closes its event loop while TensorStore's other
  reads are still in flight; each then prints a traceback from its completion callback
  (dozens, minutes of scrolling, none of them the cause). Python's own stderr is held for
  the attempt, and after a failure until those reads have finished; everything else it
  received is passed on.
  """

  _NOISE = re.compile(
      r"Traceback \(most recent call last\):\n"
      r"|  File \"[^\"]*asyncio[/\\]base_events\.py\", line \d+, in (call_soon_threadsafe|_check_closed)\n"
      r"|    self\._check_closed\(\)\n"
      r"|    raise RuntimeError\('Event loop is closed'\)\n"
      r"|RuntimeError: Event loop is closed\n")

  def __init__(self):
    self._chunks = []

  def write(self, text):
    self._chunks.append(text)
    return len(text)

  def flush(self):
    pass

  def settle(self, quiet_s: float = 0.5, max_s: float = 10.0):
    """Waits until nothing was written for `quiet_s` (at most `max_s`), collecting the
    abandoned read coroutines meanwhile (each one's exception is "ignored" with a page of
    TensorStore spec when it is destroyed)."""
    start = time.monotonic()
    seen = -1
    while len(self._chunks) != seen and time.monotonic() - start < max_s:
      seen = len(self._chunks)
      time.sleep(quiet_s)
      gc.collect()


  def passed_on(self) -> str:
    return self._NOISE.sub("", "".join(self._chunks))


@contextlib.contextmanager
def _tensorstore_teardown_quiet():
  quiet, real = _TensorstoreTeardownQuiet(), sys.stderr
  sys.stderr = quiet
  try:
    yield quiet
  finally:
    sys.stderr = real
    rest = quiet.passed_on()
    if rest.strip():
      real.write(rest)
