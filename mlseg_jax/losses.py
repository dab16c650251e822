"""Losses of the reference recipe.

Segmentation: softmax cross-entropy with an ignore label. mmseg 0.17 averages over ALL
pixels with ignored ones counted as 0 ("all_pixels", the reference setting); "valid_pixels"
averages over labelled pixels only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.errors import DataError
from mlseg_jax.models.mlseg import class_histogram, lookup_classes, rank_labels, rank_of_class
from mlseg_jax.resize import upsample_logits

REDUCTIONS = ("all_pixels", "valid_pixels")


def check_labels(labels, num_classes: int, ignore_label: int = IGNORE_LABEL) -> None:
  """Refuses label values other than 0..num_classes-1 and `ignore_label`, which would give
  a NaN or silently wrong loss. Concrete labels only: inside a jitted step the labels come
  from the data pipeline, whose readers check every file's values."""
  try:
    values = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    return
  bad = (values != ignore_label) & ((values < 0) | (values >= num_classes))
  if bad.any():
    found = np.unique(values[bad])
    hint = (" (the reference's ignore value 255 is -1 here)"
            if 255 in found and ignore_label != 255 else "")
    raise DataError(f"labels hold {found[:8].tolist()}{' ...' if len(found) > 8 else ''}: "
                    f"expected class ids 0..{num_classes - 1} or {ignore_label} for "
                    f"ignored pixels{hint}")


def segmentation_cross_entropy(logits, labels, *, reduction: str = "all_pixels",
                               ignore_label: int = IGNORE_LABEL):
  """Per-batch mean cross-entropy. logits (B, H, W, C) at label size, labels (B, H, W)."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree")
  check_labels(labels, logits.shape[-1], ignore_label)
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  # The label's entry picked by a select, not a gather: a gather's gradient is a scatter
  # into a (B, H, W, C) zero tensor, written out in full (XLA:CPU; 512x512x50 floats for
  # MLSeg at 512).
  picked = jnp.arange(logp.shape[-1]) == safe[..., None]
  nll = -jnp.where(picked, logp, 0.0).sum(-1)
  nll = jnp.where(valid, nll, 0.0)
  if reduction == "all_pixels":
    return nll.mean()
  return nll.sum() / jnp.maximum(valid.sum(), 1)


def segmenter_losses(outputs, labels, model_config):
  """Segmenter's loss (mask transformer, linear): cross-entropy at label size.

  outputs: the Segmenter's dict; labels: (B, H, W) int32 crops.
  """
  del model_config
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


# ---------------------------------------------------------------------------------------
# MLSeg's losses and the extras the reference logs.


def mlseg_losses(outputs, labels, model_config):
  """Total loss and logged scalars of an MLSeg head. labels: (B, H, W) int32 crops.

  Image loss: weight x (BCE-with-logits, mean | AsymmetricLoss) on the multi-hot of the
  crop's classes. Segmentation loss: cross-entropy over the k rank slots (labels of
  unselected classes ignored), averaged as mmseg 0.17 does. +GT has only the latter.
  Metrics, per image then averaged over the batch (the reference's value with one image
  per device, averaged over devices): acc_seg (its `acc_seg`, % of all pixels, ignored
  ones counted wrong), pixel_recall (`acc_pix`: share of labelled pixels whose class is
  selected), image_recall (`acc_img`: share of present classes selected) and
  image_accuracy (`acc_img_accuracy`: share of selected classes present). Images without
  labelled pixels score 1 on both recalls, as the reference does.
  """
  c = model_config
  n_cls = c.num_classes
  if labels.ndim != 3:
    raise ValueError(f"labels must be (B, H, W), got {labels.shape}")
  check_labels(labels, n_cls)
  hist = class_histogram(labels, n_cls)  # (B, n_cls)
  present = hist > 0
  size = labels.shape[1:]
  metrics = {}
  if "label_set" in outputs:  # +GT: classes outside the set take no part in the softmax.
    selected = outputs["label_set"]
    logits = upsample_logits(outputs["logits"], size)
    logits = jnp.where(selected[:, None, None, :], logits, -1e9)
    targets = jnp.where(lookup_classes(selected, labels, n_cls, False), labels, IGNORE_LABEL)
    total = jnp.zeros((), jnp.float32)
  else:
    topk_index = outputs["topk_index"]
    selected = rank_of_class(topk_index, n_cls) >= 0
    logits = upsample_logits(outputs["rank_logits"], size)
    targets = rank_labels(labels, topk_index, n_cls)
    multi_hot = present.astype(jnp.float32)
    if c.img_loss == "bce":
      loss_img = binary_cross_entropy_with_logits(outputs["image_logits"], multi_hot)
    elif c.img_loss == "asl":
      loss_img = asymmetric_loss(outputs["image_logits"], multi_hot,
                                        gamma_neg=c.gamma_neg, gamma_pos=c.gamma_pos)
    else:
      raise ValueError(f"model.img_loss={c.img_loss!r} is not 'bce' or 'asl'")
    total = c.img_loss_weight * loss_img
    metrics["loss_img"] = total
  loss_seg = segmentation_cross_entropy(logits, targets)
  metrics["loss_seg"] = loss_seg

  b = labels.shape[0]
  correct = (jnp.argmax(logits, -1) == targets) & (targets != IGNORE_LABEL)
  metrics["acc_seg"] = 100.0 * correct.reshape(b, -1).mean(-1).mean()
  hits = present & selected
  labelled = hist.sum(-1)
  metrics["pixel_recall"] = jnp.where(
      labelled > 0, jnp.where(selected, hist, 0).sum(-1) / jnp.maximum(labelled, 1), 1.0).mean()
  n_present = present.sum(-1)
  metrics["image_recall"] = jnp.where(
      n_present > 0, hits.sum(-1) / jnp.maximum(n_present, 1), 1.0).mean()
  metrics["image_accuracy"] = (hits.sum(-1) / selected.sum(-1)).mean()
  return total + loss_seg, metrics
