"""Preemption: a signal sets a flag; training stops at a step boundary with a checkpoint.

SIGTERM (a TPU VM preemption, SLURM's time limit or `scancel`, Kubernetes) and SIGINT
(Ctrl-C) never raise. An exception raised from a handler lands wherever the main thread
happens to be -- inside a JAX callback (where it is swallowed), a queue lock, the middle of
a donated step -- so the handler only records the signal and the training loop asks
`should_stop(step)` after each step, saves that step and exits with `EXIT_CODE`.

On several processes every one of them must save the *same* step, or the collective save
never completes. JAX's preemption sync manager (started by `jax.distributed.initialize`)
catches SIGTERM itself: when any process receives one, the coordination service tells the
others, and all of them agree on the step max(steps reached) + 1, at which
`multihost_utils.reached_preemption_sync_point` turns True on every process. So with
several processes SIGTERM is left to JAX, and SIGINT is handed on to it as a SIGTERM to
this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable

from absl import logging

# JAX is imported where it is used, not here: `install()` runs before anything imports
# JAX, so that a Ctrl-C while it loads is kept too (raised, it would be swallowed by a JAX
# garbage-collection callback, and the run would go on).

# sysexits.h EX_TEMPFAIL, "try again later": the run stopped early with a complete
# checkpoint; rerunning the same command resumes it. Launchers requeue on it.
EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[str] = []  # Signal names, in order; appended to by the handler only.
_stopping = threading.Event()  # Set once the loop has decided to stop.
_forwarded = threading.Event()  # A signal handed on to JAX's notifier.
_warned = threading.Event()
_previous: dict = {}  # The handlers install() replaced; empty while not installed.


class Preempted(Exception):
  """Training stopped early for a signal; the checkpoint of `step` is complete."""

  def __init__(self, step: int, reason: str, checkpoint: str):
    super().__init__(f"stopped at step {step} ({reason}); checkpoint {checkpoint} is "
                     "complete: rerun the same command to resume")
    self.step, self.reason, self.checkpoint = step, reason, checkpoint


class Interrupted(Exception):
  """Raised between evaluation batches once a signal has arrived (one process only)."""


def _write_stderr(message: str) -> None:
  # os.write, not logging: the handler may run while the main thread holds logging's lock.
  try:
    os.write(2, message.encode())
  except OSError:
    pass


def _handler(signum, frame):
  del frame
  name = signal.Signals(signum).name
  _received.append(name)
  if len(_received) == 1:
    _write_stderr(f"\n{name} received: stopping at the end of this step, after a "
                  "checkpoint\n")
  else:
    # A second signal while the checkpoint is written must not cut the write short.
    _write_stderr(f"\n{name} received again: still finishing the checkpoint (kill -9 "
                  "stops at once; the previous checkpoint stays intact)\n")
  if signum == signal.SIGINT and _jax_owns_sigterm():
    _forward()


def _forward():
  """To JAX's SIGTERM notifier, so that every process hears of it (once)."""
  if not _forwarded.is_set():
    _forwarded.set()
    os.kill(os.getpid(), signal.SIGTERM)


def _jax_owns_sigterm() -> bool:
  """Whether jax.distributed runs here with its preemption sync (and so its SIGTERM
  handler). Looked up without importing JAX: not imported yet means not started."""
  distributed = sys.modules.get("jax._src.distributed")  # Where jax.distributed keeps it.
  state = getattr(distributed, "global_state", None)
  return (getattr(state, "client", None) is not None
          and getattr(state, "preemption_sync_manager", None) is not None)


def install() -> bool:
  """From now on SIGTERM / SIGINT are recorded for `should_stop` instead of ending the
  process; False if there was nothing to do (not the main thread, or installed already).

  The entry point calls it first thing, before JAX is imported, and for training never
  undoes it: a signal during start-up is kept for the first step boundary, and one during
  the teardown after the last checkpoint changes nothing. `jax.distributed.initialize`
  later takes SIGTERM over (its preemption notifier); signals recorded before are handed
  on to it.
  """
  if threading.current_thread() is not threading.main_thread() or _previous:
    return False  # Signals reach the main thread only; or they are handled already.
  del _received[:]
  _stopping.clear()
  _forwarded.clear()
  ours = (signal.SIGINT,) if _jax_owns_sigterm() else _SIGNALS
  _previous.update({s: signal.signal(s, _handler) for s in ours})
  return True


def _restore_handlers() -> None:
  for s, h in _previous.items():
    signal.signal(s, h)
  _previous.clear()


def uninstall() -> None:
  """Back to the handlers `install()` replaced; a signal recorded meanwhile is delivered
  to them now (what it would have done had it come a moment later)."""
  if _previous:
    _restore_handlers()
    if _received:
      os.kill(os.getpid(), signal.Signals[_received[0]])


@contextlib.contextmanager
def handling_signals():
  """`install()` for the duration (for `train.train` called from Python); nestable."""
  installed = install()
  try:
    yield
  finally:
    if installed:
      _restore_handlers()


def requested() -> bool:
  """Whether this process has received a signal (SIGINT / SIGTERM) since handling began."""
  return bool(_received)


def reason() -> str:
  if _received:
    return _received[0]
  return "preemption notice on another process" if _jax_owns_sigterm() else "stop"


def should_stop(step: int) -> bool:
  """Called once per step boundary with the steps done so far, on every process alike.

  One process: whether a signal arrived. Several: whether all processes reached the step
  they agreed to stop at (every process must call this at every step for the agreement;
  calling it twice with the same step is harmless).
  """
  import jax
  from jax.experimental import multihost_utils

  if _stopping.is_set():
    return True
  if not _jax_owns_sigterm() and jax.process_count() > 1 and not _warned.is_set():
    _warned.set()
    logging.warning("jax's preemption service is off (jax_enable_preemption_service): a "
                    "signal reaching one process stops only that one")
  if _jax_owns_sigterm():
    if _received:
      _forward()  # Came before jax.distributed had its notifier.
    stop = multihost_utils.reached_preemption_sync_point(int(step))
  else:
    stop = requested()
  if stop:
    _stopping.set()
    if _jax_owns_sigterm():
      # JAX's notifier has done its work; a later SIGTERM must not end the save early.
      with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _handler)
  return stop


def check_interrupted() -> None:
  """Raises `Interrupted` if a signal arrived, where stopping needs no other process.

  For long loops between step boundaries (evaluation): on one process they can stop at
  once; on several, every process would have to stop at the same batch, so they run on
  and the training loop stops at the agreed step after them.
  """
  if requested() and not _jax_owns_sigterm():
    raise Interrupted(reason())


def call_with_timeout(fn: Callable[[], object], timeout: float, what: str) -> bool:
  """Runs `fn` in a daemon thread, waiting `timeout` s: shutdown must never hang a stop."""
  done = threading.Event()
  errors = []

  def run():
    try:
      fn()
    except Exception as e:  # noqa: BLE001  (reported below, never raised into a stop)
      errors.append(e)
    finally:
      done.set()

  threading.Thread(target=run, name=f"close-{what}", daemon=True).start()
  if not done.wait(timeout):
    logging.warning("%s did not finish within %.0f s; going on without it", what, timeout)
    return False
  if errors:
    logging.warning("%s failed: %s", what, errors[0])
    return False
  return True


def exit(code: int = EXIT_CODE, timeout: float = 60.0) -> None:
  """Ends a training process whose checkpoint is complete: sys.exit(code), bounded.

  Signals are ignored from here on (SIG_IGN, which Python's own finalisation keeps, where
  it would reset a Python handler to the default and a late SIGTERM would turn a clean
  exit into a kill), and a watchdog ends the process if interpreter teardown (the
  distributed client, a library's thread) has not within `timeout` s.
  """
  if threading.current_thread() is threading.main_thread():
    for s in _SIGNALS:
      signal.signal(s, signal.SIG_IGN)

  def watchdog():
    time.sleep(timeout)
    _write_stderr(f"teardown took more than {timeout:.0f} s: exiting now\n")
    os._exit(code)

  threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
  sys.stdout.flush()
  sys.stderr.flush()
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1:
    # Process 0 hosts the coordination service: if it left first, the others would be
    # aborted by their distributed client. Leave together.
    call_with_timeout(jax.distributed.shutdown, timeout / 2, "jax.distributed.shutdown")
  sys.exit(code)
