"""MLSeg's head ablations (REFERENCE.md §3): "2 TranDec Layers" and "Global Pooling".

Both replace MLSeg's block-0 multi-label branch (`mlseg.MLSegHead`) by a separate image
classifier on the encoder map average-pooled to `pool_grid` x `pool_grid` (16 in the
reference); the k best classes select among the raw class embeddings, and all `n_layers`
blocks segment with them. The heads, by `model.decoder` (the reference's classes):
  "mlseg_trandec"  MLSegAblationHead(classifier="trandec") [MaskTransformerRankSegDecoderHead
                   + RankSegDecoderHead]: TranDecClassifier, a Query2Label decoder
                   (cross-attention only, post-norm) with the class embeddings as queries.
  "mlseg_pooling"  MLSegAblationHead(classifier="pooling") [MaskTransformerRankSegDecoderHead
                   + RankSegGlobalPoolingHead]: GlobalPoolingClassifier, a mean over the
                   map and two 1x1 convs.
Outputs as the other selecting heads' (`mlseg.py`'s docstring). The classifier's
parameters are under `img_cls_head`, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlseg_jax.models.mask_transformer import MaskTransformerBase
from mlseg_jax.models.mlseg import (GroupWiseLinear, adaptive_avg_pool, check_topk,
                                    segment_topk_classes, torch_uniform)
from mlseg_jax.models.vit import Dropout, trunc_normal

Dtype = Any

# The reference's Query2Label decoder ("2 TranDec Layers"): RankSegDecoderHead's defaults.
TRANDEC_HEADS = 8
TRANDEC_FFN = 2048
TRANDEC_DROPOUT = 0.1
TRANDEC_LAYERS = 2


# ---------------------------------------------------------------------------------------
# "2 TranDec Layers": the Query2Label decoder.


def sine_position_embedding(h: int, w: int, dim: int) -> np.ndarray:
  """DETR's normalised sine embedding of an (h, w) grid -> (h * w, dim), float32.

  [y features; x features], each dim/2 wide with sin/cos interleaved, computed in float32
  step by step as the reference's PositionEmbeddingSine(normalize=True) does.
  """
  f32 = np.float32
  n = dim // 2
  y = np.broadcast_to(np.arange(1, h + 1, dtype=f32)[:, None], (h, w))
  x = np.broadcast_to(np.arange(1, w + 1, dtype=f32)[None, :], (h, w))
  scale = f32(2 * math.pi)
  y = y / (f32(h) + f32(1e-6)) * scale
  x = x / (f32(w) + f32(1e-6)) * scale
  dim_t = f32(10000) ** (f32(2) * (np.arange(n, dtype=f32) // f32(2)) / f32(n))

  def features(pos):
    pos = pos[..., None] / dim_t  # (h, w, n)
    return np.stack([np.sin(pos[..., 0::2]), np.cos(pos[..., 1::2])], -1).reshape(h, w, n)

  return np.concatenate([features(y), features(x)], -1).reshape(h * w, dim).astype(f32)


class CrossAttention(nn.Module):
  """torch.nn.MultiheadAttention's math (packed in_proj, q scaled by head_dim**-0.5)."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, *, train: bool):
    d = query.shape[-1]
    h = self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by {h} heads")
    w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
    w, bias = w.astype(self.dtype), bias.astype(self.dtype)
    split = lambda t, i: (t @ w[:, i * d:(i + 1) * d] + bias[i * d:(i + 1) * d]).reshape(
        t.shape[0], t.shape[1], h, d // h)
    q = split(query, 0) * (d // h) ** -0.5  # (B, Q, H, Dh)
    k, v = split(key, 1), split(value, 2)  # (B, S, H, Dh)
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    probs = Dropout(self.dropout)(probs, deterministic=not train)
    y = jnp.einsum("bhqs,bshd->bqhd", probs, v).reshape(query.shape[0], query.shape[1], d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="out_proj")(y)


class TranDecLayer(nn.Module):
  """Query2Label decoder layer without self-attention: post-norm cross-attention + ReLU FFN."""
  num_heads: int = TRANDEC_HEADS
  d_ff: int = TRANDEC_FFN
  dropout: float = TRANDEC_DROPOUT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt, memory, pos, query_pos, *, train: bool):
    d = tgt.shape[-1]
    drop = lambda t: Dropout(self.dropout)(t, deterministic=not train)
    attn = CrossAttention(num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype,
                          name="multihead_attn")
    y = attn(tgt + query_pos, memory + pos, memory, train=train)
    tgt = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(tgt + drop(y))
    y = nn.Dense(self.d_ff, dtype=self.dtype, kernel_init=trunc_normal(), name="linear1")(tgt)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="linear2")(
        drop(nn.relu(y)))
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm3")(tgt + drop(y))


class TranDecClassifier(nn.Module):
  """"2 TranDec Layers": Query2Label over the pooled map, class embeddings as queries.

  Queries start at zero with the class embeddings as their position; keys carry a fixed
  sine position embedding. (B, s, s, C_enc) map, (B, n_cls, D) embeddings -> (B, n_cls).
  """
  num_classes: int
  num_layers: int = TRANDEC_LAYERS
  num_heads: int = TRANDEC_HEADS
  d_ff: int = TRANDEC_FFN
  dropout: float = TRANDEC_DROPOUT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled, class_emb, *, train: bool):
    b, sh, sw, c_in = pooled.shape
    d = class_emb.shape[-1]
    memory = nn.Conv(d, (1, 1), dtype=self.dtype,
                     kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     bias_init=torch_uniform(1 / math.sqrt(c_in)), name="input_proj")(pooled)
    memory = memory.reshape(b, sh * sw, d)  # (B, S, D)
    pos = jnp.asarray(sine_position_embedding(sh, sw, d), self.dtype)[None]  # (1, S, D)
    query_pos = class_emb.astype(self.dtype)  # (B, n_cls, D)
    tgt = jnp.zeros_like(query_pos)
    for i in range(self.num_layers):
      layer = TranDecLayer(num_heads=self.num_heads, d_ff=self.d_ff, dropout=self.dropout,
                           dtype=self.dtype, name=f"layers_{i}")
      tgt = layer(tgt, memory, pos, query_pos, train=train)
    tgt = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(tgt)
    return GroupWiseLinear(self.num_classes, name="fc")(tgt)


# ---------------------------------------------------------------------------------------
# "Global Pooling".


class GlobalPoolingClassifier(nn.Module):
  """"Global Pooling": mean over the pooled map, 1x1 conv + ReLU, 1x1 conv to n_cls."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):  # (B, s, s, C_enc) -> (B, n_cls)
    c = pooled.shape[-1]
    x = pooled.astype(jnp.float32).mean((1, 2), keepdims=True).astype(self.dtype)
    # mmcv ConvModule's init (kaiming normal, fan_out, ReLU); then torch's Conv2d default.
    x = nn.relu(nn.Conv(c, (1, 1), dtype=self.dtype,
                        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        name="conv")(x))
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=torch_uniform(1 / math.sqrt(c)), name="cls_conv")(x)
    return x.reshape(x.shape[0], self.num_classes)


# ---------------------------------------------------------------------------------------
# The head: either classifier, then the selection and segmentation of `mlseg.py`.


class MLSegAblationHead(MaskTransformerBase):
  """The head ablations: a separate multi-label classifier on the pooled encoder map
  selects among the raw class embeddings; all `n_layers` blocks segment.

  (B, gh, gw, D_enc) tokens [, (B, n_cls, D) OCE class tokens] -> dict (`mlseg.py`).
  """
  classifier: str = "trandec"  # "trandec" ("2 TranDec Layers") or "pooling".
  topk: int = 50
  pool_grid: int = 16  # Pooled grid the classifier reads (the reference's 16x16).

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    del labels
    check_topk(self.topk, self.num_classes)
    if self.pool_grid <= 0:
      raise ValueError("the ablation heads classify a pooled map: model.pool_grid must be "
                       f"> 0 (the reference uses 16), got {self.pool_grid}")
    b, gh, gw, _ = tokens.shape
    classes = self.class_embeddings(class_emb, b)  # (B, n_cls, D)
    pooled = adaptive_avg_pool(tokens, (self.pool_grid, self.pool_grid))  # Encoder width.
    if self.classifier == "trandec":
      image_logits = TranDecClassifier(num_classes=self.num_classes, dtype=self.dtype,
                                       name="img_cls_head")(pooled, classes, train=train)
    elif self.classifier == "pooling":
      image_logits = GlobalPoolingClassifier(num_classes=self.num_classes, dtype=self.dtype,
                                             name="img_cls_head")(pooled)
    else:
      raise ValueError(f"classifier={self.classifier!r} is not 'trandec' or 'pooling'")
    patches = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    return segment_topk_classes(self, patches, classes, image_logits, self.decoder_blocks(),
                                (gh, gw), train=train)
