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


# ---------------------------------------------------------------------------------------
# Multi-label image losses (MLSeg, REFERENCE.md §3). logits, targets: (B, n_cls).


def binary_cross_entropy_with_logits(logits, targets):
  """torch.nn.BCEWithLogitsLoss(reduction="mean"), in the same stable form."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  return jnp.mean(jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))


def _focusing(base, gamma: float):
  # base ** 0 would still send 0 * base**-1 = nan gradients where base is 0.
  return jnp.ones_like(base) if gamma == 0 else base ** gamma


def asymmetric_loss(logits, targets, *, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-5):
  """AsymmetricLoss (Ben-Baruch et al.) as the reference computes it: summed, / B / n_cls.

  The negative probability is shifted by `clip` (capped at 1) before both the log and the
  focusing weight; log arguments are clamped at `eps`; the focusing weight keeps its
  gradient (the reference's disable_torch_grad_focal_loss=False).
  """
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p_pos = jax.nn.sigmoid(x)
  p_neg = 1.0 - p_pos
  if clip is not None and clip > 0:
    p_neg = jnp.minimum(p_neg + clip, 1.0)
  loss = t * jnp.log(jnp.maximum(p_pos, eps)) + (1.0 - t) * jnp.log(jnp.maximum(p_neg, eps))
  if gamma_neg > 0 or gamma_pos > 0:
    base = 1.0 - p_pos * t - p_neg * (1.0 - t)
    loss = loss * jnp.where(t > 0, _focusing(base, gamma_pos), _focusing(base, gamma_neg))
  return -loss.sum() / x.shape[0] / x.shape[1]
