"""Converted checkpoints on disk, and starting a model from one (`config.init_from`).

A directory written by `save_params` (so by `python -m mlseg_jax.convert`) holds
  params/           the parameter tree, an Orbax (StandardCheckpointer) checkpoint in our names
  conversion.json   where it came from: {"source": {"format", "file", ...}, "model": the
                    model config it was converted for}
`load_params` and `init_from` also read a training step (WORKDIR/checkpoints/STEP, whose
`state/` holds a TrainState: its `params` are taken), e.g. to export a trained model.

`init_from` is how training starts from pretrained weights: every tensor of the checkpoint
must exist in the model with the same shape; model parameters the checkpoint lacks keep
their fresh init (an AugReg backbone initialises a whole Segmenter this way) and are
returned so the caller can log them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mlseg_jax.models.segmenter import default_model_config
from mlseg_jax.param_tree import ConversionError, flatten, resize_pos_embed_np, unflatten
from mlseg_jax.paths import absolute_path

PARAMS_DIR = "params"
INFO_FILE = "conversion.json"


def _params_dir(directory) -> epath.Path:
  """Ours (DIR/params), a training step (DIR/state, a TrainState) or a bare Orbax tree."""
  directory = absolute_path(directory)
  for sub in (PARAMS_DIR, "state"):
    if (directory / sub / "_METADATA").is_file():
      return directory / sub
  if (directory / "_METADATA").is_file():
    return directory
  raise FileNotFoundError(f"{directory} holds no converted checkpoint (no {PARAMS_DIR}/; "
                          "write one with `python -m mlseg_jax.convert`)")


def save_params(directory, params: Mapping[str, Any], *, source: Optional[Mapping] = None,
                model_config=None, overwrite: bool = False) -> epath.Path:
  """Writes `params` (a nested dict of arrays) and the JSON note to `directory` (local or
  `gs://`)."""
  directory = absolute_path(directory)
  if directory.exists() and any(directory.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{directory} exists and is not empty (overwrite=True replaces it)")
    if (directory / PARAMS_DIR).exists():
      (directory / PARAMS_DIR).rmtree()
  directory.mkdir(parents=True, exist_ok=True)
  tree = unflatten({p: np.asarray(v) for p, v in flatten(params).items()})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, tree)
  checkpointer.wait_until_finished()
  info = {"source": dict(source or {})}
  if model_config is not None:
    info["model"] = model_config.to_dict()
  (directory / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
  return directory


def load_info(directory) -> dict:
  """The JSON note next to a checkpoint ({} when there is none)."""
  path = epath.Path(directory) / INFO_FILE
  return json.loads(path.read_text()) if path.is_file() else {}


def model_config_from_info(info: Mapping) -> Any:
  """The model config recorded by `save_params`, on top of today's defaults."""
  c = default_model_config()
  for key, value in info["model"].items():
    if key not in c:
      raise ValueError(f"{INFO_FILE}: model.{key} is not a model config field here")
    if isinstance(c[key], tuple) and isinstance(value, list):
      value = tuple(value)
    c[key] = value
  return c


def _read(directory) -> dict:
  """The parameter tree as host numpy arrays, whatever devices it was saved from."""
  path = _params_dir(directory)
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  # Newer Orbax wraps the tree's metadata in StepMetadata.item_metadata.tree.
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  restore_args = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  if "params" in tree and "step" in tree:  # A training state: its weights only.
    tree = tree["params"]
  return tree


def _place(value: np.ndarray, like):
  """`value` in the dtype and, for jax arrays, the sharding of `like`."""
  value = np.asarray(value, dtype=like.dtype)
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return value
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_params(directory, target: Optional[Mapping[str, Any]] = None) -> dict:
  """The checkpoint's parameter tree.

  Without `target`: numpy arrays as saved. With `target` (arrays or ShapeDtypeStructs, e.g.
  `jax.eval_shape` of the model's init): the trees must match exactly, path for path and
  shape for shape, and each leaf comes back in the target's dtype (and sharding).
  """
  loaded = _read(directory)
  if target is None:
    return loaded
  flat, want = flatten(loaded), flatten(target)
  problems = [f"{'/'.join(p)} is in the checkpoint, not in the model" for p in flat
              if p not in want]
  problems += [f"{'/'.join(p)} is in the model, not in the checkpoint" for p in want
               if p not in flat]
  problems += [f"{'/'.join(p)}: checkpoint {tuple(flat[p].shape)}, model "
               f"{tuple(want[p].shape)}" for p in flat
               if p in want and tuple(flat[p].shape) != tuple(want[p].shape)]
  if problems:
    raise ConversionError(f"{directory} does not match the model:\n  " + "\n  ".join(problems))
  return unflatten({p: _place(v, want[p]) for p, v in flat.items()})


def init_from(params: Mapping[str, Any], directory) -> tuple[dict, list[str]]:
  """Freshly initialised `params` with every tensor of the checkpoint in `directory`.

  Returns (params, kept): kept lists ('/'-joined) the model parameters the checkpoint does
  not have, which keep their init. A checkpoint tensor the model lacks, or of another
  shape, is an error naming it; the one exception is a position embedding stored for
  another crop, which is resized with PyTorch's bicubic as mmseg does when it loads
  pretrained weights.
  """
  loaded, flat = flatten(_read(directory)), flatten(params)
  out, problems = dict(flat), []
  for path, value in loaded.items():
    name = "/".join(path)
    if path not in flat:
      problems.append(f"{name} is in the checkpoint, not in the model")
      continue
    want = tuple(flat[path].shape)
    if tuple(value.shape) != want and path[-1] == "pos_embedding":
      try:
        value = resize_pos_embed_np(np.asarray(value), want)
      except ConversionError as e:
        problems.append(f"{name}: {e}")
        continue
    if tuple(value.shape) != want:
      problems.append(f"{name}: checkpoint {tuple(value.shape)}, model {want}")
      continue
    out[path] = _place(value, flat[path])
  if problems:
    raise ConversionError(f"{os.fspath(directory)} does not fit the model:\n  " +
                          "\n  ".join(problems))
  kept = ["/".join(p) for p in flat if p not in loaded]
  return unflatten(out), kept
