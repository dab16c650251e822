"""Losses of the reference recipe.

Segmentation: softmax cross-entropy with an ignore label. mmseg 0.17 averages over ALL
pixels with ignored ones counted as 0 ("all_pixels", the reference setting); "valid_pixels"
averages over labelled pixels only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlseg_jax import IGNORE_LABEL

REDUCTIONS = ("all_pixels", "valid_pixels")


def segmentation_cross_entropy(logits, labels, *, reduction: str = "all_pixels",
                               ignore_label: int = IGNORE_LABEL):
  """Per-batch mean cross-entropy. logits (B, H, W, C) at label size, labels (B, H, W)."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree")
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  if reduction == "all_pixels":
    return nll.mean()
  return nll.sum() / jnp.maximum(valid.sum(), 1)


def compute_losses(outputs, labels, model_config):
  """Total training loss and the scalars to log, for any decoder of `model_config`.

  outputs: the Segmenter's dict; labels: (B, H, W) int32 crops.
  """
  from mlseg_jax.models.segmenter import upsample_logits  # Deferred: pulls in flax.

  if model_config.decoder.startswith("mlseg"):
    from mlseg_jax.models import mlseg  # Deferred: registers the MLSeg heads.
    return mlseg.mlseg_losses(outputs, labels, model_config)
  logits = upsample_logits(outputs["logits"], labels.shape[1:])
  loss = segmentation_cross_entropy(logits, labels)
  return loss, {"loss_seg": loss}
