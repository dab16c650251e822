"""Segmenter's decoders: the mask transformer and the linear decoder (REFERENCE.md §2).

The mask transformer runs patch tokens and n_cls learned class tokens through a few
transformer blocks; each class's mask is the cosine similarity between the projected
patch tokens and the projected class token, normalised over the class axis.
Parameter names are the reference's (`proj_dec`, `cls_emb`, `blocks_N`, `decoder_norm`,
`proj_patch`, `proj_classes`, `mask_norm`).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mlseg_jax.models.vit import Block, trunc_normal

Dtype = Any


def projection_init(d_model):
  """`d**-0.5 * randn(d, d)`, the reference's init of proj_patch / proj_classes."""
  def init(key, shape, dtype=jnp.float32):
    return d_model ** -0.5 * nn.initializers.normal(1.0)(key, shape, dtype)
  return init


def cosine_masks(patches, classes, proj_patch, proj_classes):
  """Mask logits before mask_norm: (B, N, D), (B, K, D) -> (B, N, K).

  Both sides are L2-normalised with no epsilon, as in the reference.
  """
  patches = patches @ proj_patch.astype(patches.dtype)
  classes = classes @ proj_classes.astype(classes.dtype)
  patches = patches / jnp.linalg.norm(patches.astype(jnp.float32), axis=-1,
                                      keepdims=True).astype(patches.dtype)
  classes = classes / jnp.linalg.norm(classes.astype(jnp.float32), axis=-1,
                                      keepdims=True).astype(classes.dtype)
  return jnp.einsum("bnd,bkd->bnk", patches, classes)


def decoder_blocks(n_layers, n_heads, d_ff, dropout, drop_path_rate, dtype, attention_impl,
                   start=0):
  """The decoder's transformer blocks (LayerNorm eps 1e-5, as nn.LayerNorm's default)."""
  rates = np.linspace(0.0, drop_path_rate, n_layers)
  return [Block(n_heads, d_ff, dropout, float(rates[i]), 1e-5, dtype, attention_impl,
                name=f"blocks_{i}") for i in range(start, n_layers)]


class MaskTransformer(nn.Module):
  """Segmenter's mask transformer: (B, gh, gw, D_enc) tokens -> (B, gh, gw, n_cls) logits."""
  num_classes: int
  d_model: int = 768
  n_layers: int = 2
  n_heads: int = 12
  d_ff: int = 3072
  dropout: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    del labels  # Only the +GT head reads labels.
    b, gh, gw, _ = tokens.shape
    n_cls = self.num_classes
    x = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                 name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    if class_emb is None:  # OCE hands the class tokens over from the backbone.
      class_emb = self.param("cls_emb", trunc_normal(), (1, n_cls, self.d_model))
      class_emb = jnp.broadcast_to(class_emb, (b, n_cls, self.d_model))
    x = jnp.concatenate([x, class_emb.astype(x.dtype)], 1)
    for blk in decoder_blocks(self.n_layers, self.n_heads, self.d_ff, self.dropout,
                              self.drop_path_rate, self.dtype, self.attention_impl):
      x = blk(x, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(x)
    patches, classes = x[:, :-n_cls], x[:, -n_cls:]
    proj_patch = self.param("proj_patch", projection_init(self.d_model),
                            (self.d_model, self.d_model))
    proj_classes = self.param("proj_classes", projection_init(self.d_model),
                              (self.d_model, self.d_model))
    masks = cosine_masks(patches, classes, proj_patch, proj_classes)  # (B, N, n_cls)
    masks = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="mask_norm")(masks)
    return {"logits": masks.reshape(b, gh, gw, n_cls)}


class LinearDecoder(nn.Module):
  """Segmenter's "linear" decoder: one Linear from the encoder width to n_cls."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    del class_emb, train, labels
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=trunc_normal(),
                      name="head")(tokens)
    return {"logits": logits}  # (B, gh, gw, n_cls)
