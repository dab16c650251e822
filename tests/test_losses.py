import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.losses import segmentation_cross_entropy


def _case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 6, 7)).astype(np.int32)
  labels[0, :2] = IGNORE_LABEL
  labels[1, 3, 3] = IGNORE_LABEL
  return logits, labels


def test_cross_entropy_reference_reduction_counts_ignored_pixels_as_zero():
  logits, labels = _case()
  t_labels = torch.from_numpy(np.where(labels == IGNORE_LABEL, 255, labels)).long()
  per_pixel = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), t_labels,
                              ignore_index=255, reduction="none")
  ref = per_pixel.sum() / per_pixel.numel()  # mmseg 0.17: mean over all pixels.
  ours = segmentation_cross_entropy(logits, labels, reduction="all_pixels")
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


def test_cross_entropy_valid_pixel_mean():
  logits, labels = _case(1)
  t_labels = torch.from_numpy(np.where(labels == IGNORE_LABEL, 255, labels)).long()
  ref = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), t_labels,
                        ignore_index=255)
  ours = segmentation_cross_entropy(logits, labels, reduction="valid_pixels")
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_and_bad_input_fails():
  logits, labels = _case(2)
  labels[:] = IGNORE_LABEL
  assert float(segmentation_cross_entropy(logits, labels, reduction="valid_pixels")) == 0.0
  with pytest.raises(ValueError, match="reduction"):
    segmentation_cross_entropy(logits, labels, reduction="mean")
  with pytest.raises(ValueError, match="disagree"):
    segmentation_cross_entropy(logits, labels[:, :3])


def test_labels_outside_the_classes_are_refused_with_the_values_found():
  from mlseg_jax.errors import DataError
  from mlseg_jax.losses import mlseg_losses

  logits, labels = _case()
  labels[0, 0, 0] = 255  # The reference's ignore value, handed over unconverted.
  with pytest.raises(DataError, match=r"labels hold \[255\]: expected class ids 0..3 or -1 "
                                      r"for ignored pixels \(the reference's ignore value 255"):
    segmentation_cross_entropy(logits, labels)
  config = type("C", (), {"num_classes": 4})()
  with pytest.raises(DataError, match=r"labels hold \[-7, 255\]"):
    labels[1, 0, 0] = -7
    mlseg_losses({}, labels, config)


def test_labels_inside_a_jitted_loss_are_left_to_the_data_pipeline():
  import jax

  logits, labels = _case()
  loss = jax.jit(segmentation_cross_entropy)(logits, labels)
  np.testing.assert_allclose(float(loss), float(segmentation_cross_entropy(logits, labels)),
                             rtol=1e-6)


def test_cross_entropy_gradient_equals_torch_and_needs_no_scatter():
  logits, labels = _case(3)
  t_logits = torch.from_numpy(logits).permute(0, 3, 1, 2).requires_grad_()
  t_labels = torch.from_numpy(np.where(labels == IGNORE_LABEL, 255, labels)).long()
  F.cross_entropy(t_logits, t_labels, ignore_index=255, reduction="sum").div(
      labels.size).backward()
  loss = lambda x: segmentation_cross_entropy(x, labels)
  grad = jax.grad(loss)(jnp.asarray(logits))
  np.testing.assert_allclose(grad, t_logits.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                             atol=1e-7)
  # The label's entry is selected, not gathered: a gather's gradient scatters into a full
  # zero tensor of the logits' size.
  hlo = jax.jit(jax.grad(loss)).lower(jnp.asarray(logits)).compile().as_text()
  assert " scatter(" not in hlo and " gather(" not in hlo
