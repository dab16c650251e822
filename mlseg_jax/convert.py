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

A layout is a list of `Rule(torch_key, path, kind)`: the state-dict key, the path in our
parameter tree, and how the tensor is laid out differently (`dense`: Linear weight (out, in)
vs Dense kernel (in, out); `conv`: OIHW vs HWIO; `conv1x1`: a 1x1 Conv2d (out, in, 1, 1) as a
Dense kernel (in, out); `pos_embed`: resized to the model's grid; `same`). Conversion checks
coverage both ways: every source tensor is used (or explicitly dropped), every target
parameter filled, every shape equal; anything else is one error listing every offending key.

torch is imported only to read or write `.pth` files; tensors are read through `.numpy()`.
Files and directories may be local or `gs://` (read and written through etils.epath).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from mlseg_jax.models.segmenter import abstract_params
from mlseg_jax.param_tree import ConversionError, flatten, resize_pos_embed_np, unflatten
from mlseg_jax.paths import absolute_path


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_key: str
  path: tuple[str, ...]
  kind: str = "same"  # "same", "dense", "conv", "conv1x1", "pos_embed"


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


def mmcv_block_rules(torch_prefix: str, path: tuple[str, ...]) -> list[Rule]:
  """mmcv's TransformerEncoderLayer (the ViT of mmseg 0.17 / 1.x, the reference's, and
  mmseg 1.x's Segmenter decoder): `ln1`, `attn.attn` (an nn.MultiheadAttention, whose
  `in_proj_weight` stacks q, k, v like timm's qkv), `ln2`, `ffn.layers.0.0` / `.1`."""
  return [
      *_norm(f"{torch_prefix}ln1", path + ("norm1",)),
      Rule(f"{torch_prefix}attn.attn.in_proj_weight", path + ("attn", "qkv", "kernel"),
           "dense"),
      Rule(f"{torch_prefix}attn.attn.in_proj_bias", path + ("attn", "qkv", "bias")),
      *_dense(f"{torch_prefix}attn.attn.out_proj", path + ("attn", "proj")),
      *_norm(f"{torch_prefix}ln2", path + ("norm2",)),
      *_dense(f"{torch_prefix}ffn.layers.0.0", path + ("mlp", "fc1")),
      *_dense(f"{torch_prefix}ffn.layers.1", path + ("mlp", "fc2")),
  ]


def mmcv_vit_rules(depth: int, prefix: str = "backbone.", path: tuple[str, ...] = ("backbone",),
                   with_cls_emb: bool = False) -> list[Rule]:
  """mmseg's `VisionTransformer` (final_norm=True, so the last norm is `ln1`); with OCE
  (`with_cls_emb=True`) the reference adds the class tokens `cls_emb`."""
  rules = [
      Rule(f"{prefix}cls_token", path + ("cls",)),
      Rule(f"{prefix}pos_embed", path + ("pos_embedding",), "pos_embed"),
      Rule(f"{prefix}patch_embed.projection.weight", path + ("embedding", "kernel"), "conv"),
      Rule(f"{prefix}patch_embed.projection.bias", path + ("embedding", "bias")),
      *_norm(f"{prefix}ln1", path + ("norm",)),
  ]
  if with_cls_emb:
    rules.append(Rule(f"{prefix}cls_emb", path + ("cls_emb",)))
  for i in range(depth):
    rules += mmcv_block_rules(f"{prefix}layers.{i}.", path + (f"blocks_{i}",))
  return rules


def mmseg_mask_head_rules(n_layers: int, prefix: str = "decode_head.",
                          path: tuple[str, ...] = ("decode_head",)) -> list[Rule]:
  """mmseg 1.x's `SegmenterMaskTransformerHead`: mmcv layers, `dec_proj`, `cls_emb`, the
  bias-free Linears `patch_proj` / `classes_proj` (x @ W.T, so our matrix is W.T),
  `decoder_norm`, `mask_norm`. Its unused `conv_seg` is in MMSEG_MASK_HEAD_DROPPED."""
  rules = [
      *_dense(f"{prefix}dec_proj", path + ("proj_dec",)),
      Rule(f"{prefix}cls_emb", path + ("cls_emb",)),
      Rule(f"{prefix}patch_proj.weight", path + ("proj_patch",), "dense"),
      Rule(f"{prefix}classes_proj.weight", path + ("proj_classes",), "dense"),
      *_norm(f"{prefix}decoder_norm", path + ("decoder_norm",)),
      *_norm(f"{prefix}mask_norm", path + ("mask_norm",)),
  ]
  for i in range(n_layers):
    rules += mmcv_block_rules(f"{prefix}layers.{i}.", path + (f"blocks_{i}",))
  return rules


# BaseDecodeHead builds `conv_seg` and SegmenterMaskTransformerHead never uses it.
MMSEG_MASK_HEAD_DROPPED = (r"^decode_head\.conv_seg\.",)


def mmseg_linear_head_rules(prefix: str = "decode_head.",
                            path: tuple[str, ...] = ("decode_head",)) -> list[Rule]:
  """mmseg 1.x's Segmenter "linear" configs: an FCNHead with num_convs=0, i.e. its 1x1
  `conv_seg` alone."""
  return [Rule(f"{prefix}conv_seg.weight", path + ("head", "kernel"), "conv1x1"),
          Rule(f"{prefix}conv_seg.bias", path + ("head", "bias"))]


def reference_linear_head_rules(prefix: str = "decode_head.",
                                path: tuple[str, ...] = ("decode_head",)) -> list[Rule]:
  """The reference's `DecoderLinear` (rstrudel/segmenter's linear decoder): `head`. The
  reference ships no config for it; these are the names its module would save."""
  return _dense(f"{prefix}head", path + ("head",))


def augreg_rules(depth: int, path: tuple[str, ...] = ("backbone",)) -> list[Rule]:
  """big_vision / vision_transformer `.npz` names, after `fuse_augreg_attention`.

  Flax already stores our layouts (Dense kernels (in, out), Conv kernels HWIO); only the
  per-head q/k/v/out kernels differ, and the fusing step turns them into the virtual
  `.../MultiHeadDotProductAttention_1/{qkv,out}` entries named here.
  """
  rules = [
      Rule("cls", path + ("cls",)),
      Rule("Transformer/posembed_input/pos_embedding", path + ("pos_embedding",), "pos_embed"),
      Rule("embedding/kernel", path + ("embedding", "kernel")),
      Rule("embedding/bias", path + ("embedding", "bias")),
      Rule("Transformer/encoder_norm/scale", path + ("norm", "scale")),
      Rule("Transformer/encoder_norm/bias", path + ("norm", "bias")),
  ]
  for i in range(depth):
    b, p = f"Transformer/encoderblock_{i}/", path + (f"blocks_{i}",)
    mha = f"{b}MultiHeadDotProductAttention_1/"
    rules += [
        Rule(f"{b}LayerNorm_0/scale", p + ("norm1", "scale")),
        Rule(f"{b}LayerNorm_0/bias", p + ("norm1", "bias")),
        Rule(f"{mha}qkv/kernel", p + ("attn", "qkv", "kernel")),
        Rule(f"{mha}qkv/bias", p + ("attn", "qkv", "bias")),
        Rule(f"{mha}out/kernel", p + ("attn", "proj", "kernel")),
        Rule(f"{mha}out/bias", p + ("attn", "proj", "bias")),
        Rule(f"{b}LayerNorm_2/scale", p + ("norm2", "scale")),
        Rule(f"{b}LayerNorm_2/bias", p + ("norm2", "bias")),
        Rule(f"{b}MlpBlock_3/Dense_0/kernel", p + ("mlp", "fc1", "kernel")),
        Rule(f"{b}MlpBlock_3/Dense_0/bias", p + ("mlp", "fc1", "bias")),
        Rule(f"{b}MlpBlock_3/Dense_1/kernel", p + ("mlp", "fc2", "kernel")),
        Rule(f"{b}MlpBlock_3/Dense_1/bias", p + ("mlp", "fc2", "bias")),
    ]
  return rules


# The ImageNet classifier (and the representation layer of older files).
AUGREG_DROPPED = (r"^head/", r"^pre_logits/")


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


def torch_to_params(state_dict: Mapping[str, Any], rules: Iterable[Rule],
                    target: Mapping[str, Any], *, dropped: Sequence[str] = (),
                    partial: bool = False,
                    pos_grid: Optional[Sequence[int]] = None) -> dict:
  """Converts `state_dict` into a parameter tree shaped like `target`.

  Args:
    state_dict: torch key -> tensor (torch.Tensor or array).
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


# ---------------------------------------------------------------------------------------
# MLSeg heads (mlseg_jax/models/mlseg.py), in the reference's torch names.


def mlseg_head_rules(n_layers: int = 3, prefix: str = "decode_head.",
                     path: tuple[str, ...] = ("decode_head",),
                     with_cls_emb: bool = True) -> list[Rule]:
  """MaskTransformerRankSegHead: the mask transformer's names plus the multi-label branch
  (`decoder_norm2`, `ml_fc.W`, `ml_fc.b`); `mask_norm` is over the k rank slots.
  with_cls_emb=False for OCE (`cls_emb_from_backbone=True`)."""
  return [
      *mask_transformer_rules(n_layers, prefix, path, with_cls_emb),
      *_norm(f"{prefix}decoder_norm2", path + ("decoder_norm2",)),
      Rule(f"{prefix}ml_fc.W", path + ("ml_fc", "W")),
      Rule(f"{prefix}ml_fc.b", path + ("ml_fc", "b")),
  ]


def trandec_head_rules(n_layers: int = 2, num_decoder_layers: int = 2,
                       prefix: str = "decode_head.",
                       path: tuple[str, ...] = ("decode_head",),
                       with_cls_emb: bool = True) -> list[Rule]:
  """MaskTransformerRankSegDecoderHead with img_cls_head=RankSegDecoderHead ("2 TranDec
  Layers"). Its fixed sine table `img_cls_head.position_embedding.pe` is a buffer we
  recompute: pass `dropped=TRANDEC_DROPPED`."""
  head, hp = f"{prefix}img_cls_head.", path + ("img_cls_head",)
  rules = [
      *mask_transformer_rules(n_layers, prefix, path, with_cls_emb),
      Rule(f"{head}input_proj.weight", hp + ("input_proj", "kernel"), "conv"),
      Rule(f"{head}input_proj.bias", hp + ("input_proj", "bias")),
      *_norm(f"{head}transformer.decoder.norm", hp + ("decoder_norm",)),
      Rule(f"{head}fc.W", hp + ("fc", "W")),
      Rule(f"{head}fc.b", hp + ("fc", "b")),
  ]
  for i in range(num_decoder_layers):
    t, p = f"{head}transformer.decoder.layers.{i}.", hp + (f"layers_{i}",)
    rules += [
        Rule(f"{t}multihead_attn.in_proj_weight", p + ("multihead_attn", "in_proj_kernel"),
             "dense"),
        Rule(f"{t}multihead_attn.in_proj_bias", p + ("multihead_attn", "in_proj_bias")),
        *_dense(f"{t}multihead_attn.out_proj", p + ("multihead_attn", "out_proj")),
        *_dense(f"{t}linear1", p + ("linear1",)),
        *_dense(f"{t}linear2", p + ("linear2",)),
        *_norm(f"{t}norm2", p + ("norm2",)),
        *_norm(f"{t}norm3", p + ("norm3",)),
    ]
  return rules


TRANDEC_DROPPED = (r"img_cls_head\.position_embedding\.pe$",)


def pooling_head_rules(n_layers: int = 2, prefix: str = "decode_head.",
                       path: tuple[str, ...] = ("decode_head",),
                       with_cls_emb: bool = True) -> list[Rule]:
  """MaskTransformerRankSegDecoderHead with img_cls_head=RankSegGlobalPoolingHead:
  Sequential(AdaptiveAvgPool2d, ConvModule(1x1 conv + ReLU), Conv2d 1x1 to n_cls)."""
  head, hp = f"{prefix}img_cls_head.", path + ("img_cls_head",)
  return [
      *mask_transformer_rules(n_layers, prefix, path, with_cls_emb),
      Rule(f"{head}1.conv.weight", hp + ("conv", "kernel"), "conv"),
      Rule(f"{head}1.conv.bias", hp + ("conv", "bias")),
      Rule(f"{head}2.weight", hp + ("cls_conv", "kernel"), "conv"),
      Rule(f"{head}2.bias", hp + ("cls_conv", "bias")),
  ]


def gt_head_rules(n_layers: int = 2, prefix: str = "decode_head.",
                  path: tuple[str, ...] = ("decode_head",),
                  with_cls_emb: bool = True) -> list[Rule]:
  """MaskTransformerRankSegGTHead ("+GT"): `mask_norm` is a SelectedLayerNorm over n_cls
  slots with `gamma` / `beta` instead of LayerNorm's weight / bias."""
  return [
      *[r for r in mask_transformer_rules(n_layers, prefix, path, with_cls_emb)
        if not r.torch_key.startswith(f"{prefix}mask_norm.")],
      Rule(f"{prefix}mask_norm.gamma", path + ("mask_norm", "gamma")),
      Rule(f"{prefix}mask_norm.beta", path + ("mask_norm", "beta")),
  ]


def oce_rules(prefix: str = "backbone.", path: tuple[str, ...] = ("backbone",)) -> list[Rule]:
  """OCE's class tokens in the reference's backbone (`with_cls_emb=True`)."""
  return [Rule(f"{prefix}cls_emb", path + ("cls_emb",))]


def mlseg_decode_head_rules(model_config, prefix: str = "decode_head.",
                            path: tuple[str, ...] = ("decode_head",)) -> list[Rule]:
  """The rule table of `model_config.decoder`'s MLSeg head (any "mlseg*" decoder)."""
  c = model_config
  if c.decoder == "mlseg":
    return mlseg_head_rules(c.n_layers, prefix, path, with_cls_emb=not c.oce)
  if c.decoder == "mlseg_trandec":
    return trandec_head_rules(c.n_layers, prefix=prefix, path=path, with_cls_emb=not c.oce)
  if c.decoder == "mlseg_pooling":
    return pooling_head_rules(c.n_layers, prefix, path, with_cls_emb=not c.oce)
  if c.decoder == "mlseg_gt":
    return gt_head_rules(c.n_layers, prefix, path, with_cls_emb=not c.oce)
  raise ValueError(f"model.decoder={c.decoder!r} is not an MLSeg head")


# ---------------------------------------------------------------------------------------
# Checkpoint files and formats: what `python -m mlseg_jax.convert` runs.

FORMATS = ("augreg_npz", "timm", "mmseg", "reference")

# Not parameters: mmengine's input normalisation constants.
MMSEG_DROPPED = (r"^data_preprocessor\.",)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint format maps onto a model config's parameter tree."""
  rules: list
  dropped: tuple = ()
  backbone_only: bool = False  # Fills backbone/... only; the decoder keeps its init.


def vit_depth(model_config) -> int:
  from mlseg_jax.models.vit import VARIANTS

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
  if fmt == "mmseg":
    if c.oce:
      raise ConversionError("mmsegmentation has no OCE backbone (model.oce=True); OCE "
                            "checkpoints come from the reference: --format reference")
    if c.decoder == "mask_transformer":
      return Layout(mmcv_vit_rules(depth) + mmseg_mask_head_rules(c.n_layers),
                    MMSEG_DROPPED + MMSEG_MASK_HEAD_DROPPED)
    if c.decoder == "linear":
      return Layout(mmcv_vit_rules(depth) + mmseg_linear_head_rules(), MMSEG_DROPPED)
    raise ConversionError(f"mmsegmentation has no {c.decoder!r} head (model.decoder); MLSeg "
                          "checkpoints come from the reference: --format reference")
  if fmt == "reference":
    backbone = mmcv_vit_rules(depth, with_cls_emb=c.oce)
    if c.decoder == "mask_transformer":
      return Layout(backbone + mask_transformer_rules(c.n_layers, with_cls_emb=not c.oce))
    if c.decoder == "linear":
      return Layout(backbone + reference_linear_head_rules())
    if c.decoder.startswith("mlseg"):
      dropped = TRANDEC_DROPPED if c.decoder == "mlseg_trandec" else ()
      return Layout(backbone + mlseg_decode_head_rules(c), dropped)
    raise ConversionError(f"no reference layout for model.decoder={c.decoder!r}")
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


def read_checkpoint(path, *, trust_pickle: bool = False) -> dict:
  """{key: array or torch.Tensor} of an `.npz`, `.safetensors` or torch `.pth` file.

  torch is imported only for `.pth` (and for `.safetensors` in dtypes numpy lacks).
  `.pth` files load with torch's `weights_only=True` unless `trust_pickle`: some mmengine
  checkpoints keep Python objects in their `meta` and need it, for files you trust.
  """
  file = epath.Path(path)
  path = os.fspath(path)
  if not file.is_file():
    raise FileNotFoundError(f"no checkpoint file {path}")
  if path.endswith(".npz"):
    with file.open("rb") as stream, np.load(stream, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    import safetensors.numpy

    data = file.read_bytes()
    try:
      return _unwrap_state_dict(safetensors.numpy.load(data), path)
    except (TypeError, ValueError):  # bfloat16 and friends: numpy has no such dtype.
      import safetensors.torch

      return _unwrap_state_dict(safetensors.torch.load(data), path)
  import pickle

  import torch

  try:
    with file.open("rb") as stream:
      obj = torch.load(stream, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({e}). If you "
                          "trust the file, pass --trust_pickle") from e
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
  from mlseg_jax.models.vit import VARIANTS

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
      params = torch_to_params(state, layout.rules, backbone, dropped=layout.dropped,
                               partial=True, pos_grid=grid)
      # OCE's class tokens are not in any ViT checkpoint: zeros, as the reference starts.
      filled = flatten(params)
      unfilled = [p for p in flatten(backbone) if p not in filled
                  and p != ("backbone", "cls_emb")]
      if unfilled:
        raise ConversionError("checkpoint does not fill the backbone:\n  " + "\n  ".join(
            f"parameter {'/'.join(p)} not filled by the checkpoint" for p in unfilled))
    else:
      check_num_classes(state, c)
      params = torch_to_params(state, layout.rules, target, dropped=layout.dropped,
                               pos_grid=grid)
  except ConversionError as e:
    raise ConversionError(f"{os.fspath(path)} (--format {fmt}): {e}") from None
  filled = flatten(params)
  return params, ["/".join(p) for p in flatten(target) if p not in filled]


def convert_to_orbax(fmt: str, path, model_config, output, *, trust_pickle: bool = False,
                     overwrite: bool = False) -> list[str]:
  """`convert_checkpoint` and `pretrained.save_params`; returns the not-filled paths."""
  from mlseg_jax import pretrained

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
  import torch

  from mlseg_jax import pretrained

  info = pretrained.load_info(directory)
  if model_config is None:
    if "model" not in info:
      raise ConversionError(f"{directory} records no model config: pass --config")
    model_config = pretrained.model_config_from_info(info)
  params = pretrained.load_params(directory)
  backbone_only = set(params) == {"backbone"}
  state = params_to_torch(params, export_rules(model_config, backbone_only))
  meta = {"mlseg_jax": {"from": os.fspath(absolute_path(directory)),
                        "names": "reference backbone" if backbone_only else "reference",
                        "model": json.dumps(model_config.to_dict(), default=str)}}
  with epath.Path(output).open("wb") as f:
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in state.items()}, "meta": meta}, f)
  return state


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

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
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if config is not None and "model" not in config:
    raise app.UsageError("--config must define `config.model` (a model config)")
  model_config = config.model if config is not None else None
  if f.to == "torch":
    if f.format:
      raise app.UsageError("--to torch reads our own Orbax checkpoint: drop --format")
    if epath.Path(f.output).exists() and not f.overwrite:
      raise app.UsageError(f"{f.output} exists; pass --overwrite to replace it")
    state = export_torch(f.input, f.output, model_config)
    print(f"wrote {len(state)} tensors in the reference's names to {f.output}")
    return
  if not f.format or model_config is None:
    raise app.UsageError("converting needs --format and --config")
  try:
    not_filled = convert_to_orbax(f.format, f.input, model_config, f.output,
                                  trust_pickle=f.trust_pickle, overwrite=f.overwrite)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {f.output} from {f.input} ({f.format})")
  if not_filled:
    print(f"{len(not_filled)} parameters are not in the checkpoint and keep their init "
          f"under --config.init_from: {', '.join(not_filled[:8])}"
          f"{', ...' if len(not_filled) > 8 else ''}")


def _run_cli() -> None:
  import sys
  from pathlib import Path

  # Config files import `configs.common`: the repository root must be importable.
  repo = str(Path(__file__).resolve().parents[1])
  if repo not in sys.path:
    sys.path.insert(0, repo)
  from absl import app

  # Run the imported module, not this `__main__` copy: rule tables further down the file
  # are not defined yet when this block runs, and its ConversionError would be a twin class.
  from mlseg_jax import convert

  convert._define_flags()
  app.run(convert.main)


if __name__ == "__main__":
  _run_cli()
