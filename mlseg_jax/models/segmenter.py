"""Segmenter: ViT backbone + decode head, and the model factory used by every config.

`Segmenter(images) -> dict` holds "logits" (B, H/16, W/16, n_cls) on the padded token grid,
plus whatever the head adds (MLSeg: "image_logits", "topk_index", "rank_logits").
The decoder comes from `decoders.py`'s table (`config.model.decoder`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.vit import REMAT_POLICIES, VARIANTS, ViT, grid_mask

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Segmenter(nn.Module):
  backbone: nn.Module
  decode_head: nn.Module

  def __call__(self, images, *, train: bool = False, labels=None, valid_grid=None):
    """valid_grid: optional (B, 2) int32 token grid of each image's own content when the
    images are smaller windows zero-padded to one shape (`ViT`): heads whose
    `DecoderSpec.masks_padding` is set then compute, in those cells, what the unpadded
    window gives (elsewhere the logits are 0)."""
    if valid_grid is None:
      tokens, aux = self.backbone(images, train=train)
      out = self.decode_head(tokens, aux.get("class_tokens"), train=train, labels=labels)
      return dict(out, tokens=tokens)
    tokens, aux = self.backbone(images, train=train, valid_grid=valid_grid)
    out = self.decode_head(tokens, aux.get("class_tokens"), train=train, labels=labels,
                           valid_grid=valid_grid)
    inside = grid_mask(valid_grid, tokens.shape[1:3]).reshape(tokens.shape[:3])[..., None]
    return dict(out, tokens=tokens, logits=jnp.where(inside, out["logits"], 0))


def default_model_config() -> ml_collections.ConfigDict:
  """Every field a model config may set; configs start from this (unknown keys fail)."""
  c = ml_collections.ConfigDict()
  c.num_classes = 150
  c.backbone = "B/16"
  # Overrides of the variant's width / depth / heads (None: the variant's), for tiny models.
  c.backbone_width = ml_collections.config_dict.placeholder(int)
  c.backbone_depth = ml_collections.config_dict.placeholder(int)
  c.backbone_heads = ml_collections.config_dict.placeholder(int)
  c.img_size = (512, 512)  # Grid the position embedding is stored for (mmseg img_size).
  c.drop_path_rate = 0.1
  c.decoder = "mask_transformer"  # A name in models/decoders.py.
  c.d_model = 768
  c.n_layers = 2
  c.n_heads = 12
  c.d_ff = 3072
  c.dropout = 0.1
  c.decoder_drop_path_rate = 0.0
  # MLSeg (REFERENCE.md §3); read only by the mlseg* decoders.
  c.topk = 50
  # The multi-label branch reads the patch tokens average-pooled to a pool_grid x pool_grid
  # grid (the reference's `downsample`); 0 = all patch tokens.
  c.pool_grid = 8
  c.img_loss = "bce"  # "bce" or "asl".
  c.gamma_neg = 0.0
  c.gamma_pos = 0.0
  c.img_loss_weight = 10.0
  # OCE (REFERENCE.md §4): class embeddings from the backbone.
  c.oce = False
  c.oce_start_layer = 11
  c.oce_init = "zeros"
  # Numerics and memory.
  c.dtype = "float32"
  c.remat = False  # Rematerialise each ViT block in the backward pass.
  c.remat_policy = "nothing_saveable"  # What it keeps: a name in vit.REMAT_POLICIES.
  # None: cuDNN's fused kernel on NVIDIA GPUs when computing in bf16/fp16, XLA elsewhere.
  c.attention_impl = ml_collections.config_dict.placeholder(str)  # None, "xla", "cudnn".
  return c


def resolve_attention_impl(requested: Optional[str], dtype: str) -> str:
  """`model.attention_impl`, with None resolved for the default device: cuDNN's fused
  flash attention on NVIDIA GPUs when computing in bf16/fp16 (it has no float32 kernel),
  XLA's attention elsewhere."""
  if requested is not None:
    return requested
  if dtype in ("bfloat16", "float16"):
    device = jax.devices()[0]
    if device.platform == "gpu" and "cuda" in device.client.platform_version.lower():
      return "cudnn"
  return "xla"


def build_model(c: ml_collections.ConfigDict) -> Segmenter:
  """The Segmenter of a model config (`config.model`)."""
  spec = decoder_spec(c)
  if c.backbone not in VARIANTS:
    raise ValueError(f"model.backbone={c.backbone!r} is not one of {sorted(VARIANTS)}")
  if c.dtype not in DTYPES:
    raise ValueError(f"model.dtype={c.dtype!r} is not one of {sorted(DTYPES)}")
  if c.attention_impl not in (None, "xla", "cudnn"):
    raise ValueError(f"model.attention_impl={c.attention_impl!r} is not one of None (cuDNN "
                     "on NVIDIA GPUs in bf16/fp16, else XLA), 'xla', 'cudnn' (GPUs, with "
                     "dtype bfloat16 or float16)")
  if c.attention_impl == "cudnn" and c.dtype not in ("bfloat16", "float16"):
    raise ValueError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, "
                     f"not {c.dtype!r}: cuDNN's fused attention has no float32 kernel")
  if c.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={c.remat_policy!r} is not one of "
                     f"{sorted(REMAT_POLICIES)}")
  impl = resolve_attention_impl(c.attention_impl, c.dtype)
  if impl != c.attention_impl:
    c = c.copy_and_resolve_references()
    c.attention_impl = impl
  dtype = DTYPES[c.dtype]
  backbone = ViT(
      variant=c.backbone, width_override=c.backbone_width,
      depth_override=c.backbone_depth, heads_override=c.backbone_heads, img_size=tuple(c.img_size), drop_path_rate=c.drop_path_rate,
      num_class_tokens=c.num_classes if c.oce else 0,
      class_token_start_layer=c.oce_start_layer, class_token_init=c.oce_init,
      remat=c.remat, remat_policy=c.remat_policy, dtype=dtype, attention_impl=c.attention_impl)
  return Segmenter(backbone=backbone, decode_head=spec.build(c, dtype))


def abstract_params(c: ml_collections.ConfigDict) -> dict:
  """The parameter tree of `build_model(c)` as ShapeDtypeStructs (nothing computed)."""
  model = build_model(c)
  h, w = c.img_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, h, w), jnp.int32)  # Only the +GT head reads them.
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  return jax.eval_shape(lambda x, y: model.init(rngs, x, labels=y), images, labels)["params"]
