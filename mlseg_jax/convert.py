"""Checkpoints of other frameworks <-> mlseg_jax parameter trees.

    python -m mlseg_jax.convert --format {augreg_npz,timm,mmseg,reference} \
        --input FILE --config configs/NAME.py --output DIR
    python -m mlseg_jax.convert --to torch --input DIR --output FILE.pth

The first writes an Orbax checkpoint of `config.model`'s parameter tree (`pretrained.py`)
that `--config.init_from=DIR` starts training from; the second writes a PyTorch state dict
in the reference's names. Formats: `augreg_npz` (big_vision / vision_transformer ViTs) and
`timm` (`.pth` / `.safetensors`) fill the backbone only; `mmseg` (mmsegmentation 1.x
Segmenter) and `reference` (the reference's mmseg 0.17 fork: Segmenter, MLSeg heads, OCE)
fill the whole model, or only the backbone from a bare mmcv ViT (mmseg's `vit2mmseg` files).

A layout is a list of `Rule(torch_key, path, kind)`: the tables are in `checkpoint_rules.py`,
and a decoder's spec (`models/decoders.py`) names its head's. Conversion checks coverage both
ways: every source tensor is used (or explicitly dropped), every target parameter filled,
every shape equal; anything else is one error listing every offending key.

torch is imported only to read or write `.pth` files; tensors are read through `.numpy()`.
Files and directories may be local or `gs://` (read and written through etils.epath).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import safetensors
import safetensors.numpy
from absl import flags
from etils import epath
from ml_collections import config_flags

from mlseg_jax import errors
from mlseg_jax import pretrained
from mlseg_jax.checkpoint_rules import (AUGREG_DROPPED, MMSEG_DROPPED, TIMM_DROPPED, Rule,
                                        augreg_rules, mmcv_vit_rules, timm_vit_rules)
from mlseg_jax.models.decoders import DECODERS
from mlseg_jax.models.segmenter import abstract_params
from mlseg_jax.models.vit import VARIANTS
from mlseg_jax.param_tree import ConversionError, flatten, resize_pos_embed_np, unflatten
from mlseg_jax.paths import absolute_path


def fuse_augreg_attention(arrays: Mapping[str, np.ndarray]) -> dict:
  """Per-head attention kernels -> our fused layout, under virtual `qkv` / `out` keys.

  query/key/value kernels (D, H, Dh) become one (D, 3D) kernel [q | k | v], their biases
  (H, Dh) one (3D,) bias; the out kernel (H, Dh, D) becomes (D, D). Any other key passes
  through. A block with only some of the pieces is an error naming the missing ones.
  """
  out, problems = {}, []
  blocks = sorted({m.group(1) for k in arrays
                   if (m := re.match(r"^(Transformer/encoderblock_\d+/"
                                     r"MultiHeadDotProductAttention_1/)", k))})
  fused = set()
  for mha in blocks:
    for kind in ("kernel", "bias"):
      names = [f"{mha}{n}/{kind}" for n in ("query", "key", "value")]
      missing = [n for n in names if n not in arrays]
      if missing:
        problems += [f"missing key {n!r}" for n in missing]
        continue
      parts = [np.asarray(arrays[n]) for n in names]
      if kind == "kernel":
        out[f"{mha}qkv/kernel"] = np.concatenate([p.reshape(p.shape[0], -1) for p in parts], 1)
      else:
        out[f"{mha}qkv/bias"] = np.concatenate([p.reshape(-1) for p in parts])
      fused.update(names)
    if f"{mha}out/kernel" in arrays:
      kernel = np.asarray(arrays[f"{mha}out/kernel"])  # (H, Dh, D)
      out[f"{mha}out/kernel"] = kernel.reshape(-1, kernel.shape[-1])
      fused.add(f"{mha}out/kernel")
  if problems:
    raise ConversionError("checkpoint does not match the AugReg layout:\n  " +
                          "\n  ".join(problems))
  for k, v in arrays.items():
    if k not in fused:
      out.setdefault(k, v)
  return out


# ---------------------------------------------------------------------------------------
# Generic conversion.


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _to_ours(kind: str, value: np.ndarray, target_shape,
             pos_grid: Optional[Sequence[int]] = None) -> np.ndarray:
  if kind == "dense":
    return value.T
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "conv1x1":
    if value.ndim != 4 or value.shape[2:] != (1, 1):
      return value  # Left as is: the shape check names the key.
    return value[:, :, 0, 0].T
  if kind == "pos_embed" and target_shape is not None and value.shape != tuple(target_shape):
    return resize_pos_embed_np(value, target_shape, pos_grid)
  return value


def _to_torch(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "dense":
    return value.T
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  if kind == "conv1x1":
    return value.T[:, :, None, None]
  return value


def to_params(state_dict: Mapping[str, Any], rules: Iterable[Rule],
              target: Mapping[str, Any], *, dropped: Sequence[str] = (),
              partial: bool = False, pos_grid: Optional[Sequence[int]] = None) -> dict:
  """Converts `state_dict` into a parameter tree shaped like `target`.

  Args:
    state_dict: checkpoint key -> tensor (torch.Tensor or array): a torch state dict, or
      an AugReg `.npz` after `fuse_augreg_attention`.
    rules: the layout.
    target: the parameter tree (arrays or ShapeDtypeStructs) the result must match.
    dropped: regexes of source keys that are knowingly not used (classifier heads).
    partial: allow target parameters no rule fills (e.g. converting only a backbone into
      a whole Segmenter); they are left out of the result.
    pos_grid: the (gh, gw) grid `pos_embed` rules resize to (default: a square grid).
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
    value = _to_ours(rule.kind, _to_numpy(state_dict[rule.torch_key]), want, pos_grid)
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


def from_params(params: Mapping[str, Any], rules: Iterable[Rule]) -> dict:
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


# ---------------------------------------------------------------------------------------
# Checkpoint files and formats: what `python -m mlseg_jax.convert` runs.

FORMATS = ("augreg_npz", "timm", "mmseg", "reference")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint format maps onto a model config's parameter tree."""
  rules: list
  dropped: tuple = ()
  backbone_only: bool = False  # Fills backbone/... only; the decoder keeps its init.


def vit_depth(model_config) -> int:
  c = model_config
  if c.backbone not in VARIANTS:
    raise ValueError(f"model.backbone={c.backbone!r} is not one of {sorted(VARIANTS)}")
  return c.backbone_depth or VARIANTS[c.backbone][1]


def checkpoint_layout(fmt: str, model_config, bare_backbone: bool = False) -> Layout:
  """The rules, dropped keys and coverage of checkpoint format `fmt` for a model config.

  bare_backbone: an mmcv ViT alone, without `backbone.` (mmseg's `vit2mmseg` pretrained
  weights, what the reference's `pretrained=` loads, and our backbone-only export).
  """
  c = model_config
  depth = vit_depth(c)
  if bare_backbone and fmt in ("mmseg", "reference"):
    return Layout(mmcv_vit_rules(depth, prefix=""), MMSEG_DROPPED, backbone_only=True)
  if fmt == "augreg_npz":
    return Layout(augreg_rules(depth), AUGREG_DROPPED, backbone_only=True)
  if fmt == "timm":
    return Layout(timm_vit_rules(depth, "", ("backbone",)), TIMM_DROPPED, backbone_only=True)
  # The head's tables are in its decoder spec; an unknown name has no layout either.
  spec = DECODERS.get(c.decoder)
  if fmt == "mmseg":
    if c.oce:
      raise ConversionError("mmsegmentation has no OCE backbone (model.oce=True); OCE "
                            "checkpoints come from the reference: --format reference")
    if spec is None or spec.mmseg_rules is None:
      raise ConversionError(f"mmsegmentation has no {c.decoder!r} head (model.decoder); "
                            "MLSeg checkpoints come from the reference: --format reference")
    return Layout(mmcv_vit_rules(depth) + spec.mmseg_rules(c), MMSEG_DROPPED + spec.mmseg_dropped)
  if fmt == "reference":
    if spec is None or spec.reference_rules is None:
      raise ConversionError(f"no reference layout for model.decoder={c.decoder!r}")
    return Layout(mmcv_vit_rules(depth, with_cls_emb=c.oce) + spec.reference_rules(c),
                  spec.reference_dropped)
  raise ConversionError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


def export_rules(model_config, backbone_only: bool = False) -> list[Rule]:
  """The reference's names for our parameters. A backbone alone gets the bare ViT names
  the reference's `pretrained=` loader expects (no `backbone.` prefix)."""
  if backbone_only:
    return mmcv_vit_rules(vit_depth(model_config), prefix="")
  return checkpoint_layout("reference", model_config).rules


def _unwrap_state_dict(obj, path: str) -> dict:
  """mmcv / mmengine (`meta` + `state_dict`), timm (`state_dict` or `model`) or bare."""
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  state = dict(obj)
  if state and all(k.startswith("module.") for k in state):  # Saved from DDP.
    state = {k[len("module."):]: v for k, v in state.items()}
  bad = [k for k, v in state.items() if not hasattr(v, "shape")]
  if bad:
    raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(repr, bad))}")
  return state


TORCH_INSTALL = ("pip install torch (the CPU build is enough: pip install torch "
                 "--index-url https://download.pytorch.org/whl/cpu)")


def import_torch(purpose: str):
  """torch, or a one-line error saying what needed it and how to install it."""
  try:
    import torch
  except ImportError:
    raise errors.UserError(f"{purpose} needs PyTorch, which is not installed: "
                           f"{TORCH_INSTALL}") from None
  return torch


def sniff_format(head: bytes, zip_names: Sequence[str] = ()) -> str | None:
  """What a checkpoint file really is, from its first bytes (and a zip's member names):
  "npz", "torch" (zip or legacy pickle), "safetensors", or None."""
  if head.startswith(b"PK\x03\x04"):
    if zip_names and all(n.endswith(".npy") for n in zip_names):
      return "npz"
    if any(n.endswith("data.pkl") for n in zip_names):
      return "torch"
    return None
  if head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5:  # Pickle protocol 2..5: torch's legacy.
    return "torch"
  if len(head) >= 9:
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 0 < header_len < 100_000_000:
      return "safetensors"
  return None


def _file_kind(file: epath.Path) -> str:
  with file.open("rb") as stream:
    head = stream.read(16)
  names = ()
  if head.startswith(b"PK\x03\x04"):
    with file.open("rb") as stream:
      try:
        names = zipfile.ZipFile(stream).namelist()
      except zipfile.BadZipFile:
        names = ()
  kind = sniff_format(head, names)
  if kind is None:
    raise ConversionError(f"{file} is not a checkpoint: expected a PyTorch (.pth/.pt/.bin), "
                          f"safetensors or numpy .npz file (it starts with {head[:8]!r})")
  return kind


def read_checkpoint(path, *, trust_pickle: bool = False) -> dict:
  """{key: array or torch.Tensor} of a numpy `.npz`, `.safetensors` or PyTorch file.

  The format is read from the file's first bytes, not its name. torch is imported only
  for PyTorch files (and for `.safetensors` in dtypes numpy lacks). PyTorch files load
  with torch's `weights_only=True` unless `trust_pickle`: some mmengine checkpoints keep
  Python objects in their `meta` and need it, for files you trust.
  """
  file = epath.Path(path)
  path = os.fspath(path)
  if not file.is_file():
    raise FileNotFoundError(f"no checkpoint file {path}")
  kind = _file_kind(file)
  if kind == "npz":
    with file.open("rb") as stream, np.load(stream, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if kind == "safetensors":
    data = file.read_bytes()
    try:
      return _unwrap_state_dict(safetensors.numpy.load(data), path)
    except (TypeError, ValueError):  # bfloat16 and friends: numpy has no such dtype.
      import_torch(f"reading {path} (a safetensors file in a dtype numpy lacks)")
      from safetensors.torch import load as load_with_torch

      return _unwrap_state_dict(load_with_torch(data), path)
    except safetensors.SafetensorError as e:
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
  torch = import_torch(f"reading {path} (a PyTorch checkpoint)")
  try:
    with file.open("rb") as stream:
      obj = torch.load(stream, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({first}); "
                          "if you trust the file, pass --trust_pickle") from None
  return _unwrap_state_dict(obj, path)


def _strip_augreg_prefix(arrays: Mapping[str, Any]) -> dict:
  """Training checkpoints of vision_transformer keep the weights under `opt/target/`."""
  if "opt/target/embedding/kernel" not in arrays:
    return dict(arrays)
  return {k[len("opt/target/"):]: v for k, v in arrays.items() if k.startswith("opt/target/")}


# Tensors whose shape gives the number of classes: (key regex, axis).
_CLASS_COUNT_KEYS = (
    (r"(^|\.)cls_emb$", 1),
    (r"^decode_head\.conv_seg\.weight$", 0),
    (r"^decode_head\.head\.weight$", 0),
    (r"^decode_head\.ml_fc\.W$", 1),
)


def check_num_classes(state_dict: Mapping[str, Any], model_config) -> None:
  """A clear error when the checkpoint was trained for another number of classes."""
  for pattern, axis in _CLASS_COUNT_KEYS:
    for key in sorted(state_dict):
      shape = tuple(state_dict[key].shape)
      if re.search(pattern, key) and len(shape) > axis:
        if shape[axis] != model_config.num_classes:
          raise ConversionError(f"checkpoint has {shape[axis]} classes ({key}), "
                                f"config.model.num_classes={model_config.num_classes}")


def _is_bare_backbone(state_dict: Mapping[str, Any]) -> bool:
  return ("patch_embed.projection.weight" in state_dict
          and not any(k.startswith("decode_head.") for k in state_dict))


def convert_checkpoint(fmt: str, path, model_config, *,
                       trust_pickle: bool = False) -> tuple[dict, list[str]]:
  """Reads checkpoint `path` of format `fmt` into the parameter tree of a model config.

  Returns (params, not_filled): not_filled are the model's parameters the file has no
  value for ('/'-joined paths): the decoder and OCE's class tokens for backbone-only
  files (augreg_npz, timm, a bare mmcv ViT), nothing otherwise. They keep their init
  through `pretrained.init_from`.
  Raises:
    ConversionError naming the file and every missing, unexpected or mis-shaped key, or
    the class count when it differs from model_config.num_classes.
  """
  c = model_config
  state = read_checkpoint(path, trust_pickle=trust_pickle)
  layout = checkpoint_layout(fmt, c, bare_backbone=_is_bare_backbone(state))
  patch = VARIANTS[c.backbone][3]
  grid = (c.img_size[0] // patch, c.img_size[1] // patch)
  target = abstract_params(c)
  try:
    if fmt == "augreg_npz":
      state = fuse_augreg_attention(_strip_augreg_prefix(state))
    if layout.backbone_only:
      backbone = {"backbone": target["backbone"]}
      params = to_params(state, layout.rules, backbone, dropped=layout.dropped, partial=True,
                         pos_grid=grid)
      # OCE's class tokens are not in any ViT checkpoint: zeros, as the reference starts.
      filled = flatten(params)
      unfilled = [p for p in flatten(backbone) if p not in filled
                  and p != ("backbone", "cls_emb")]
      if unfilled:
        raise ConversionError("checkpoint does not fill the backbone:\n  " + "\n  ".join(
            f"parameter {'/'.join(p)} not filled by the checkpoint" for p in unfilled))
    else:
      check_num_classes(state, c)
      params = to_params(state, layout.rules, target, dropped=layout.dropped, pos_grid=grid)
  except ConversionError as e:
    raise ConversionError(f"{os.fspath(path)} (--format {fmt}): {e}") from None
  filled = flatten(params)
  return params, ["/".join(p) for p in flatten(target) if p not in filled]


def convert_to_orbax(fmt: str, path, model_config, output, *, trust_pickle: bool = False,
                     overwrite: bool = False) -> list[str]:
  """`convert_checkpoint` and `pretrained.save_params`; returns the not-filled paths."""
  params, not_filled = convert_checkpoint(fmt, path, model_config, trust_pickle=trust_pickle)
  source = {"format": fmt, "file": os.fspath(absolute_path(path)),
            "backbone_only": set(params) == {"backbone"}, "not_filled": not_filled}
  pretrained.save_params(output, params, source=source, model_config=model_config,
                         overwrite=overwrite)
  return not_filled


def export_torch(directory, output, model_config=None) -> dict:
  """An Orbax checkpoint of ours -> `output` (.pth: {"state_dict", "meta"}), reference names.

  `model_config` defaults to the one recorded next to the checkpoint. Returns the state
  dict as numpy arrays.
  """
  torch = import_torch(f"writing {output} (a PyTorch file)")
  if not epath.Path(directory).is_dir():
    raise ConversionError(f"{directory} is not a folder written by mlseg_jax.convert or a "
                          "training run" if epath.Path(directory).exists()
                          else f"{directory} does not exist")
  info = pretrained.load_info(directory)
  if model_config is None:
    if "model" not in info:
      raise ConversionError(f"{directory} records no model config: pass --config")
    model_config = pretrained.model_config_from_info(info)
  params = pretrained.load_params(directory)
  backbone_only = set(params) == {"backbone"}
  state = from_params(params, export_rules(model_config, backbone_only))
  meta = {"mlseg_jax": {"from": os.fspath(absolute_path(directory)),
                        "names": "reference backbone" if backbone_only else "reference",
                        "model": json.dumps(model_config.to_dict(), default=str)}}
  with epath.Path(output).open("wb") as f:
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in state.items()}, "meta": meta}, f)
  return state


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Config file whose `config.model` is the model to convert for; "
      "overrides like --config.model.num_classes=171 apply.", lock_config=True)
  flags.DEFINE_enum("format", None, list(FORMATS), "Format of --input.")
  flags.DEFINE_enum("to", None, ["torch"], "Export --input (an Orbax directory of ours) "
                    "to a PyTorch state dict in the reference's names at --output.")
  flags.DEFINE_string("input", None, "Checkpoint file to convert (or, with --to, the "
                      "Orbax directory).", required=True)
  flags.DEFINE_string("output", None, "Directory to write (or, with --to, the .pth file).",
                      required=True)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  flags.DEFINE_bool("trust_pickle", False, "Unpickle .pth files fully (only files you trust).")


def main(argv) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if config is not None and "model" not in config:
    raise errors.UsageError("--config must define `config.model` (a model config)")
  model_config = config.model if config is not None else None
  if f.to == "torch":
    if f.format:
      raise errors.UsageError("--to torch reads our own Orbax checkpoint: drop --format")
    if epath.Path(f.output).exists() and not f.overwrite:
      raise errors.UsageError(f"{f.output} exists; pass --overwrite to replace it")
    state = export_torch(f.input, f.output, model_config)
    print(f"wrote {len(state)} tensors in the reference's names to {f.output}")
    return
  if not f.format or model_config is None:
    raise errors.UsageError("converting needs --format and --config")
  not_filled = convert_to_orbax(f.format, f.input, model_config, f.output,
                                trust_pickle=f.trust_pickle, overwrite=f.overwrite)
  print(f"wrote {f.output} from {f.input} ({f.format})")
  if not_filled:
    print(f"{len(not_filled)} parameters are not in the checkpoint and keep their init "
          f"under --config.init_from: {', '.join(not_filled[:8])}"
          f"{', ...' if len(not_filled) > 8 else ''}")


def _run_cli() -> None:
  # Run the imported module, not this `__main__` copy: code that imports mlseg_jax.convert
  # then sees the same module, and its flags, as the command line.
  from mlseg_jax import convert

  convert._define_flags()
  errors.run(convert.main, module="mlseg_jax.convert")


if __name__ == "__main__":
  _run_cli()
