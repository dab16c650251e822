"""Segmenter's decoders: the mask transformer and the linear decoder (REFERENCE.md §2).

The mask transformer runs patch tokens and n_cls learned class tokens through a few
transformer blocks; each class's mask is the cosine similarity between the projected
patch tokens and the projected class token, normalised over the class axis.
Parameter names are the reference's (`proj_dec`, `cls_emb`, `blocks_N`, `decoder_norm`,
`proj_patch`, `proj_classes`, `mask_norm`).

`MaskTransformerBase` holds what the mask transformer and the MLSeg heads (`mlseg.py`,
`mlseg_ablations.py`, `mlseg_gt.py`) share: their fields, their blocks, the class tokens
and the segmentation tail (blocks, `decoder_norm`, projections, cosine masks). The
reference's MLSeg heads subclass its MaskTransformerHead the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mlseg_jax.models.vit import Block, grid_mask, trunc_normal

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


class MaskTransformerBase(nn.Module):
  """The fields and pieces of every class-token decoder: the mask transformer and the
  MLSeg heads. Subclasses add their own fields and `__call__`.

  The helpers create their parameters and blocks in the calling head's own scope (they
  are methods, not submodules), so every head keeps the reference's flat names
  (`blocks_N`, `decoder_norm`, `proj_patch`, ...) that `convert.py`'s tables map.

  Attributes:
    num_classes: n_cls, the classes of the dataset.
    d_model: the decoder's width D.
    n_layers: transformer blocks (`blocks_0` ...).
    n_heads / d_ff: the blocks' attention heads and MLP width.
    dropout: on the blocks' attention probabilities and residual branches.
    drop_path_rate: the last block's stochastic depth, linearly from 0 at the first.
    dtype: the computation dtype (parameters stay float32).
    attention_impl: None, "xla" or "cudnn" (`jax.nn.dot_product_attention`).
  """
  num_classes: int
  d_model: int = 768
  n_layers: int = 2
  n_heads: int = 12
  d_ff: int = 3072
  dropout: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  def decoder_blocks(self):
    """The `n_layers` blocks (LayerNorm eps 1e-5, as nn.LayerNorm's default)."""
    rates = np.linspace(0.0, self.drop_path_rate, self.n_layers)
    return [Block(num_heads=self.n_heads, mlp_dim=self.d_ff, dropout=self.dropout,
                  drop_path=float(rates[i]), eps=1e-5, dtype=self.dtype,
                  attention_impl=self.attention_impl, name=f"blocks_{i}")
            for i in range(self.n_layers)]

  def class_embeddings(self, class_emb, batch: int):
    """The head's own `cls_emb`, or OCE's class tokens from the backbone (then no param).

    -> (B, n_cls, D).
    """
    shape = (self.num_classes, self.d_model)
    if class_emb is None:
      cls_emb = self.param("cls_emb", trunc_normal(), (1, *shape))
      return jnp.broadcast_to(cls_emb, (batch, *shape))
    if class_emb.shape[1:] != shape:
      raise ValueError(f"OCE class tokens {class_emb.shape} do not match "
                       f"n_cls={self.num_classes}, d_model={self.d_model} (OCE needs "
                       "d_model == backbone width)")
    return class_emb

  def class_masks(self, patches, classes, blocks, *, train: bool, kv_seqlen=None,
                  patch_mask=None):
    """The segmentation tail: blocks + decoder_norm + cosine masks, before mask_norm.

    patches (B, N, D), classes (B, K, D) -> (B, N, K). kv_seqlen (B,): tokens at or past
    it are hidden from attention as keys; patch_mask (B, N) bool: only these patches are
    (a padded window's own cells).
    """
    k = classes.shape[1]
    x = jnp.concatenate([patches, classes.astype(patches.dtype)], 1)
    kv_mask = None
    if patch_mask is not None:
      kv_mask = jnp.concatenate([patch_mask, jnp.ones((x.shape[0], k), bool)], 1)
    for blk in blocks:
      x = blk(x, train, kv_seqlen, kv_mask)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(x)
    d = self.d_model
    proj_patch = self.param("proj_patch", projection_init(d), (d, d))
    proj_classes = self.param("proj_classes", projection_init(d), (d, d))
    return cosine_masks(x[:, :-k], x[:, -k:], proj_patch, proj_classes)


class MaskTransformer(MaskTransformerBase):
  """Segmenter's mask transformer: (B, gh, gw, D_enc) tokens -> (B, gh, gw, n_cls) logits."""

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None,
               valid_grid=None):
    del labels  # Only the +GT head reads labels.
    b, gh, gw, _ = tokens.shape
    patches = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    classes = self.class_embeddings(class_emb, b)  # (B, n_cls, D)
    patch_mask = None if valid_grid is None else grid_mask(valid_grid, (gh, gw))
    masks = self.class_masks(patches, classes, self.decoder_blocks(), train=train,
                             patch_mask=patch_mask)  # (B, N, n_cls)
    masks = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="mask_norm")(masks)
    return {"logits": masks.reshape(b, gh, gw, self.num_classes)}


class LinearDecoder(nn.Module):
  """Segmenter's "linear" decoder: one Linear from the encoder width to n_cls."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None,
               valid_grid=None):
    del class_emb, train, labels, valid_grid  # Per token: padding changes nothing.
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=trunc_normal(),
                      name="head")(tokens)
    return {"logits": logits}  # (B, gh, gw, n_cls)
