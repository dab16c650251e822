"""PyTorch state dicts <-> mlseg_jax parameter trees.

A layout is a list of `Rule(torch_key, path, kind)`: the state-dict key, the path in our
parameter tree, and how the tensor is laid out differently (`dense`: Linear weight (out, in)
vs Dense kernel (in, out); `conv`: OIHW vs HWIO; `same`). Conversion checks coverage both
ways: every source tensor is used (or explicitly dropped), every target parameter filled,
every shape equal; anything else is one error listing every offending key.

torch itself is never imported here: tensors are read through `.numpy()`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_key: str
  path: tuple[str, ...]
  kind: str = "same"  # "same", "dense", "conv", "pos_embed"


class ConversionError(ValueError):
  pass


def _dense(torch_key, path):
  return [Rule(f"{torch_key}.weight", path + ("kernel",), "dense"),
          Rule(f"{torch_key}.bias", path + ("bias",))]


def _norm(torch_key, path):
  return [Rule(f"{torch_key}.weight", path + ("scale",)),
          Rule(f"{torch_key}.bias", path + ("bias",))]


def block_rules(torch_prefix: str, path: tuple[str, ...]) -> list[Rule]:
  """A pre-norm block in timm / Segmenter names (norm1, attn.qkv, attn.proj, norm2, mlp)."""
  return [
      *_norm(f"{torch_prefix}norm1", path + ("norm1",)),
      *_dense(f"{torch_prefix}attn.qkv", path + ("attn", "qkv")),
      *_dense(f"{torch_prefix}attn.proj", path + ("attn", "proj")),
      *_norm(f"{torch_prefix}norm2", path + ("norm2",)),
      *_dense(f"{torch_prefix}mlp.fc1", path + ("mlp", "fc1")),
      *_dense(f"{torch_prefix}mlp.fc2", path + ("mlp", "fc2")),
  ]


def timm_vit_rules(depth: int, prefix: str = "", path: tuple[str, ...] = ()) -> list[Rule]:
  """timm `VisionTransformer` names -> our ViT (`path` is where the ViT sits in the tree)."""
  rules = [
      Rule(f"{prefix}cls_token", path + ("cls",)),
      Rule(f"{prefix}pos_embed", path + ("pos_embedding",), "pos_embed"),
      Rule(f"{prefix}patch_embed.proj.weight", path + ("embedding", "kernel"), "conv"),
      Rule(f"{prefix}patch_embed.proj.bias", path + ("embedding", "bias")),
      *_norm(f"{prefix}norm", path + ("norm",)),
  ]
  for i in range(depth):
    rules += block_rules(f"{prefix}blocks.{i}.", path + (f"blocks_{i}",))
  return rules


# timm classifier parts that a segmentation model has no use for.
TIMM_DROPPED = (r"^head\.", r"^fc_norm\.", r"^head_drop\.")


def mask_transformer_rules(n_layers: int, prefix: str = "decode_head.",
                           path: tuple[str, ...] = ("decode_head",),
                           with_cls_emb: bool = True) -> list[Rule]:
  """The reference's MaskTransformerHead names (rstrudel/segmenter's decoder)."""
  rules = [
      *_dense(f"{prefix}proj_dec", path + ("proj_dec",)),
      *_norm(f"{prefix}decoder_norm", path + ("decoder_norm",)),
      Rule(f"{prefix}proj_patch", path + ("proj_patch",)),
      Rule(f"{prefix}proj_classes", path + ("proj_classes",)),
      *_norm(f"{prefix}mask_norm", path + ("mask_norm",)),
  ]
  if with_cls_emb:
    rules.append(Rule(f"{prefix}cls_emb", path + ("cls_emb",)))
  for i in range(n_layers):
    rules += block_rules(f"{prefix}blocks.{i}.", path + (f"blocks_{i}",))
  return rules


# ---------------------------------------------------------------------------------------
# Generic conversion.


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _resize_pos_embed_np(value: np.ndarray, target_shape: Sequence[int]) -> np.ndarray:
  from mlseg_jax.models.vit import resize_pos_embed  # Deferred: pulls in flax.

  old_n, new_n = value.shape[1] - 1, target_shape[1] - 1
  old_g, new_g = int(round(old_n ** 0.5)), int(round(new_n ** 0.5))
  if old_g * old_g != old_n or new_g * new_g != new_n:
    raise ConversionError(f"pos_embed {value.shape} -> {tuple(target_shape)}: only square "
                          "grids can be resized without knowing the grid")
  return np.asarray(resize_pos_embed(value.astype(np.float32), (new_g, new_g), (old_g, old_g)))


def _to_ours(kind: str, value: np.ndarray, target_shape) -> np.ndarray:
  if kind == "dense":
    return value.T
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "pos_embed" and target_shape is not None and value.shape != tuple(target_shape):
    return _resize_pos_embed_np(value, target_shape)
  return value


def _to_torch(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "dense":
    return value.T
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  return value


def torch_to_params(state_dict: Mapping[str, Any], rules: Iterable[Rule],
                    target: Mapping[str, Any], *, dropped: Sequence[str] = (),
                    partial: bool = False) -> dict:
  """Converts `state_dict` into a parameter tree shaped like `target`.

  Args:
    state_dict: torch key -> tensor (torch.Tensor or array).
    rules: the layout.
    target: the parameter tree (arrays or ShapeDtypeStructs) the result must match.
    dropped: regexes of source keys that are knowingly not used (classifier heads).
    partial: allow target parameters no rule fills (e.g. converting only a backbone into
      a whole Segmenter); they are left out of the result.
  Raises:
    ConversionError naming every missing, unexpected, unfilled or mis-shaped key.
  """
  flat_target = flatten(target)
  out, used, problems = {}, set(), []
  for rule in rules:
    if rule.torch_key not in state_dict:
      problems.append(f"missing key {rule.torch_key!r} (for {'/'.join(rule.path)})")
      continue
    if rule.path not in flat_target:
      problems.append(f"{rule.torch_key!r} maps to {'/'.join(rule.path)}, which the model "
                      "does not have")
      continue
    used.add(rule.torch_key)
    want = tuple(flat_target[rule.path].shape)
    value = _to_ours(rule.kind, _to_numpy(state_dict[rule.torch_key]), want)
    if tuple(value.shape) != want:
      problems.append(f"{rule.torch_key!r}: shape {tuple(value.shape)} after conversion, "
                      f"{'/'.join(rule.path)} needs {want}")
      continue
    out[rule.path] = value.astype(np.float32)
  unexpected = [k for k in state_dict if k not in used
                and not any(re.search(p, k) for p in dropped)]
  problems += [f"unexpected key {k!r}" for k in unexpected]
  if not partial:
    problems += [f"parameter {'/'.join(p)} not filled by the checkpoint"
                 for p in flat_target if p not in out]
  if problems:
    raise ConversionError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
  return unflatten(out)


def params_to_torch(params: Mapping[str, Any], rules: Iterable[Rule]) -> dict:
  """Our parameter tree -> {torch_key: np.ndarray}; every parameter must be covered."""
  flat = flatten(params)
  out, covered = {}, set()
  for rule in rules:
    if rule.path not in flat:
      raise ConversionError(f"parameter {'/'.join(rule.path)} (for {rule.torch_key!r}) "
                            "is not in the parameter tree")
    covered.add(rule.path)
    out[rule.torch_key] = _to_torch(rule.kind, np.asarray(flat[rule.path]))
  left = [p for p in flat if p not in covered]
  if left:
    raise ConversionError("parameters with no torch name: " +
                          ", ".join("/".join(p) for p in left))
  return out
