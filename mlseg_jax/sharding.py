"""Device mesh and sharding rules.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose
parameters and optimizer state are also split across it). Batches are split over both.
Parameters are placed by rules, data as in big_vision: a list of (regex over the
"/"-joined parameter path, tactic); the first rule that matches wins. Tactics:
  "replicate": a full copy on every device;
  "fsdp": the largest dimension divisible by the fsdp axis is split over it (parameters
    smaller than `min_fsdp_size` elements stay replicated: splitting them saves nothing).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def default_mesh_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1  # -1: every device not used by fsdp.
  c.fsdp = 1
  c.rules = ((".*", "fsdp"),)  # With fsdp = 1 this replicates everything.
  c.min_fsdp_size = 2 ** 16
  return c


def make_mesh(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = c.fsdp
  data = c.data if c.data != -1 else n // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp != n:
    raise ValueError(f"mesh data={c.data} x fsdp={c.fsdp} does not fit {n} devices "
                     f"(data * fsdp must equal the device count; data=-1 fills it)")
  # Auto axes: shardings are given explicitly at jit boundaries; XLA propagates inside.
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension the axis divides; ties go to the last (contiguous) one.
  candidates = [(d, -i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  _, neg_i = max(candidates)
  spec = [None] * len(shape)
  spec[-neg_i] = "fsdp"
  return P(*spec)


def tree_shardings(mesh: Mesh, tree, rules, min_fsdp_size: int = 2 ** 16):
  """NamedShardings for every leaf of an (abstract) tree, by the first matching rule.

  Leaves of rank 0 (step counters, scalars) are always replicated.
  """
  compiled = [(re.compile(pattern), tactic) for pattern, tactic in rules]
  for _, tactic in compiled:
    if tactic not in ("replicate", "fsdp"):
      raise ValueError(f"unknown sharding tactic {tactic!r}; use 'replicate' or 'fsdp'")

  def leaf_sharding(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    shape = getattr(leaf, "shape", ())
    for pattern, tactic in compiled:
      if pattern.search(name):
        if tactic == "fsdp" and len(shape):
          return NamedSharding(mesh, _fsdp_spec(shape, mesh.shape["fsdp"], min_fsdp_size))
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
