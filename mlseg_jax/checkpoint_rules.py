"""Other frameworks' names for our parameters: the rule tables of `convert.py`.

A layout is a list of `Rule(torch_key, path, kind)`: the checkpoint's key, the path in our
parameter tree, and how the tensor is laid out differently (`dense`: Linear weight (out, in)
vs Dense kernel (in, out); `conv`: OIHW vs HWIO; `conv1x1`: a 1x1 Conv2d (out, in, 1, 1) as a
Dense kernel (in, out); `pos_embed`: resized to the model's grid; `same`). The tables cover
timm and big_vision / vision_transformer (AugReg) ViTs, mmseg 1.x's Segmenter and the
reference's (mmseg 0.17 fork) Segmenter, MLSeg heads and OCE. `reference_name` reads the
reference's tables for one path: the names mmcv's paramwise weight-decay rules match.

Which head table a `model.decoder` uses is in its spec (`models/decoders.py`); the engine
that reads files and applies the tables is `convert.py`. Nothing here imports either.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence, Union

# A block count, or the indices to name: ANY_BLOCK names every block at once, as "{i}" in
# both the key and the path (`reference_name` fills it in).
ANY_BLOCK = ("{i}",)
Blocks = Union[int, Sequence[str]]


def _indices(blocks: Blocks):
  return range(blocks) if isinstance(blocks, int) else blocks


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


def timm_vit_rules(depth: Blocks, prefix: str = "", path: tuple[str, ...] = ()) -> list[Rule]:
  """timm `VisionTransformer` names -> our ViT (`path` is where the ViT sits in the tree)."""
  rules = [
      Rule(f"{prefix}cls_token", path + ("cls",)),
      Rule(f"{prefix}pos_embed", path + ("pos_embedding",), "pos_embed"),
      Rule(f"{prefix}patch_embed.proj.weight", path + ("embedding", "kernel"), "conv"),
      Rule(f"{prefix}patch_embed.proj.bias", path + ("embedding", "bias")),
      *_norm(f"{prefix}norm", path + ("norm",)),
  ]
  for i in _indices(depth):
    rules += block_rules(f"{prefix}blocks.{i}.", path + (f"blocks_{i}",))
  return rules


# timm classifier parts that a segmentation model has no use for.
TIMM_DROPPED = (r"^head\.", r"^fc_norm\.", r"^head_drop\.")


def mask_transformer_rules(n_layers: Blocks, prefix: str = "decode_head.",
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
  for i in _indices(n_layers):
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


def mmcv_vit_rules(depth: Blocks, prefix: str = "backbone.",
                   path: tuple[str, ...] = ("backbone",), with_cls_emb: bool = False) -> list[Rule]:
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
  for i in _indices(depth):
    rules += mmcv_block_rules(f"{prefix}layers.{i}.", path + (f"blocks_{i}",))
  return rules


def mmseg_mask_head_rules(n_layers: Blocks, prefix: str = "decode_head.",
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
  for i in _indices(n_layers):
    rules += mmcv_block_rules(f"{prefix}layers.{i}.", path + (f"blocks_{i}",))
  return rules


# Not parameters: mmengine's input normalisation constants.
MMSEG_DROPPED = (r"^data_preprocessor\.",)


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


def augreg_rules(depth: Blocks, path: tuple[str, ...] = ("backbone",)) -> list[Rule]:
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
  for i in _indices(depth):
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


# ---------------------------------------------------------------------------------------
# MLSeg heads (mlseg_jax/models/mlseg.py), in the reference's torch names.


def mlseg_head_rules(n_layers: Blocks = 3, prefix: str = "decode_head.",
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


def trandec_head_rules(n_layers: Blocks = 2, num_decoder_layers: Blocks = 2,
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
  for i in _indices(num_decoder_layers):
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


def pooling_head_rules(n_layers: Blocks = 2, prefix: str = "decode_head.",
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


def gt_head_rules(n_layers: Blocks = 2, prefix: str = "decode_head.",
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


# ---------------------------------------------------------------------------------------
# The reference's name of any one parameter (mmcv's paramwise rules match these names).


@functools.cache
def _reference_names() -> dict[tuple[str, ...], str]:
  """Our path -> the reference's key over every model, repeated blocks once as "{i}"."""
  rules = [
      *mmcv_vit_rules(ANY_BLOCK, with_cls_emb=True),
      *mask_transformer_rules(ANY_BLOCK),
      *reference_linear_head_rules(),
      *mlseg_head_rules(ANY_BLOCK),
      *trandec_head_rules(ANY_BLOCK, ANY_BLOCK),
      *pooling_head_rules(ANY_BLOCK),
      *gt_head_rules(ANY_BLOCK),
  ]
  names = {}
  for rule in rules:
    if names.setdefault(rule.path, rule.torch_key) != rule.torch_key:
      raise AssertionError(f"{'/'.join(rule.path)} has two reference names: "
                           f"{names[rule.path]!r}, {rule.torch_key!r}")
  return names


def reference_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> its name in the reference's (mmseg 0.17) checkpoints.

  Raises:
    ValueError for a path no reference table names.
  """
  template, index = [], None
  for part in path:
    m = re.match(r"^(blocks|layers)_(\d+)$", part)
    if m and index is None:  # Our tables repeat at most one level of blocks.
      part, index = f"{m.group(1)}_{ANY_BLOCK[0]}", m.group(2)
    template.append(part)
  name = _reference_names().get(tuple(template))
  if name is None:
    raise ValueError(f"no reference name for parameter {'/'.join(path)}")
  return name if index is None else name.replace(ANY_BLOCK[0], index)
