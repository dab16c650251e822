""""+GT" (REFERENCE.md §3): MLSeg with the oracle label set, the ground truth's classes.

`model.decoder = "mlseg_gt"`, MLSegOracleHead [MaskTransformerRankSegGTHead]: the image's
label set is the classes present in `labels` (the crop's at training, the whole image's
at test), so k varies per image and nothing is learnt to select. Pixels are classified
among those classes alone: `mask_norm` (SelectedLayerNorm) normalises over them, and every
other class gets -100. Returns "logits" (B, gh, gw, n_cls) and "label_set" (B, n_cls) bool.

Where we differ from the reference, on purpose: static shapes. All n_cls class tokens run
through the blocks, the ones outside the oracle set hidden from attention, so one compiled
step serves every k.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mlseg_jax.models.mask_transformer import MaskTransformerBase
from mlseg_jax.models.mlseg import UNSELECTED_LOGIT, class_histogram
from mlseg_jax.models.vit import trunc_normal


def oracle_label_set(labels, num_classes: int):
  """The +GT label set: (B, H, W) labels (any size: the crop at training, the whole image
  at test) or a ready (B, n_cls) bool set -> (B, n_cls) bool. An image with no labelled
  pixel gets class 0 alone, as in the reference."""
  if labels.ndim == 2 and labels.dtype == jnp.bool_:
    if labels.shape[1] != num_classes:
      raise ValueError(f"label set {labels.shape} does not have n_cls={num_classes} columns")
    present = labels
  elif labels.ndim == 3:
    present = class_histogram(labels, num_classes) > 0
  else:
    raise ValueError(f"+GT labels must be (B, H, W) ids or a (B, n_cls) bool set, got "
                     f"{labels.shape} {labels.dtype}")
  empty = ~present.any(-1, keepdims=True)
  return present | (empty & (jnp.arange(num_classes) == 0))


class SelectedLayerNorm(nn.Module):
  """+GT's mask_norm: normalises over the present classes only, with an unbiased variance;
  the present classes, in class-id order, use the first k of n_cls gamma/beta slots.

  With one class the reference skips the division: the output is beta[0].
  """
  num_classes: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, label_set):  # (B, N, n_cls), (B, n_cls) bool -> (B, N, n_cls)
    gamma = self.param("gamma", nn.initializers.ones, (self.num_classes,))
    beta = self.param("beta", nn.initializers.zeros, (self.num_classes,))
    x = x.astype(jnp.float32)
    present = label_set[:, None, :]  # (B, 1, n_cls)
    k = label_set.sum(-1)[:, None, None].astype(jnp.float32)  # (B, 1, 1)
    slot = jnp.maximum(jnp.cumsum(label_set, axis=-1) - 1, 0)[:, None, :]  # (B, 1, n_cls)
    mean = jnp.where(present, x, 0.0).sum(-1, keepdims=True) / k
    dev = jnp.where(present, x - mean, 0.0)
    var = (dev * dev).sum(-1, keepdims=True) / jnp.maximum(k - 1, 1)
    normed = jnp.where(k > 1, dev / jnp.sqrt(var + self.eps), dev)
    return jnp.take(gamma, slot) * normed + jnp.take(beta, slot)


class MLSegOracleHead(MaskTransformerBase):
  """"+GT": the label set is the ground truth's, k varies per image.

  Static shapes: the masks cover all n_cls classes; class tokens outside the set are
  hidden from attention (as keys, by a key length after the present ones), so the present
  ones compute what the reference's gather of the present tokens computes, and the absent
  ones are overwritten with -100.

  (B, gh, gw, D_enc) tokens [, OCE class tokens], labels -> {"logits", "label_set"}.
  """

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    if labels is None:
      raise ValueError("the +GT head (model.decoder='mlseg_gt') needs `labels`: the crop's "
                       "at training, the whole image's at test")
    b, gh, gw, _ = tokens.shape
    n_cls = self.num_classes
    label_set = oracle_label_set(labels, n_cls)  # (B, n_cls)
    patches = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    classes = self.class_embeddings(class_emb, b)  # (B, n_cls, D)
    # The present classes go first (stable: in class-id order), so one key length per
    # image hides the absent ones; the masks then go back to class order.
    order = jnp.argsort(~label_set, axis=-1, stable=True)  # (B, n_cls)
    classes = jnp.take_along_axis(classes, order[:, :, None], axis=1)
    kv_seqlen = (gh * gw + label_set.sum(-1)).astype(jnp.int32)
    masks = self.class_masks(patches, classes, self.decoder_blocks(), train=train,
                             kv_seqlen=kv_seqlen)  # (B, N, n_cls), present classes first
    masks = jnp.take_along_axis(masks, jnp.argsort(order, axis=-1)[:, None, :], axis=2)
    masks = SelectedLayerNorm(num_classes=n_cls, name="mask_norm")(masks, label_set)
    logits = jnp.where(label_set[:, None, :], masks, UNSELECTED_LOGIT).astype(self.dtype)
    return {"logits": logits.reshape(b, gh, gw, n_cls), "label_set": label_set}
