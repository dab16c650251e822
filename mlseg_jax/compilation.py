"""JAX's persistent compilation cache, and a count of what a process compiled.

A multi-scale + flip evaluation compiles a dozen forward programs, a ViT-L training step
minutes of XLA time; without a cache every new process (a resume after preemption, each
`--mode eval`) pays it again. `config.compilation_cache` names a folder (local, or gs://
through etils.epath, shared by every host of a pod) where each compiled executable is kept
under a key of the program, its shardings, the devices and the JAX/XLA versions, so a
later process loads what an earlier one compiled. Every program is kept, however quick
its compile (JAX's default keeps those over 1 s only): on a CPU most take less.
"""

from __future__ import annotations

import os
import threading

import jax
from absl import logging

from mlseg_jax import distributed

# Recorded by JAX around every backend compile request, a persistent-cache hit included.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable_cache(path: str) -> None:
  """Compiled programs are kept in, and loaded from, `path` ("" turns the cache off)."""
  if not path:
    return
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if distributed.is_main_process():
    logging.info("compilation cache: %s", path)


class CompileCounter:
  """Counts, from JAX's own monitoring events, the programs this process compiled and
  those it loaded from the persistent cache (and the seconds each took)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests, self.hits, self.seconds = 0, 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **_):
    if event == _COMPILE_EVENT:
      with self._lock:
        self.requests += 1
        self.seconds += duration

  def _on_event(self, event: str, **_):
    if event == _HIT_EVENT:
      with self._lock:
        self.hits += 1

  @property
  def compiled(self) -> int:
    return self.requests - self.hits

  def summary(self) -> str:
    return (f"compilation: {self.compiled} programs compiled, {self.hits} loaded from the "
            f"persistent cache ({self.seconds:.1f} s in all)")
