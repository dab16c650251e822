"""Each transform against a plain NumPy statement of the reference's rule."""

import colorsys

import numpy as np
import pytest

from mlseg_jax import IGNORE_LABEL
from mlseg_jax import resize as torch_resize
from mlseg_jax.data import transforms as T


# The reference's transforms one after the other (the product fuses them: TrainTransform).
def _resize(image, label, scale):
  """mmseg Resize with a fixed scale, keep ratio: image bilinear, label nearest."""
  h, w = T.rescale_size(*image.shape[:2], scale)
  return T.resize_image(image, h, w), T.resize_label(label, h, w)


def _random_crop(image, label, rng, crop_size, cat_max_ratio=1.0):
  y0, y1, x0, x1 = T.choose_crop_box(rng, label, crop_size, cat_max_ratio)
  return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_sizes_follow_mmcv_rescale_over_the_ratio_range():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = (int(v) for v in rng.integers(20, 900, 2))
    ratio = rng.uniform(0.5, 2.0)
    long_edge, short_edge = int(2048 * ratio), int(512 * ratio)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    assert T.rescale_size(h, w, (long_edge, short_edge)) == (int(h * factor + 0.5),
                                                             int(w * factor + 0.5))
  # The ratio draw: uniform in the range, both edges scaled then truncated.
  seen = [T.sample_scale(np.random.default_rng(s), (2048, 512), (0.5, 2.0)) for s in range(300)]
  assert all(1024 <= a <= 4096 and 256 <= b <= 1024 and a // 4 - 1 <= b <= a // 4 + 1
             for a, b in seen)
  image, label = _resize(_rgb(30, 40), np.zeros((30, 40), np.int32), (2048, 512))
  assert image.shape == (512, 683, 3) and label.shape == (512, 683)  # short side 512 binds.


@pytest.mark.parametrize("shape", [(30, 40, 57, 91), (30, 40, 13, 17), (24, 24, 24, 40)])
def test_image_resize_is_bilinear_with_half_pixel_centres(shape):
  in_h, in_w, out_h, out_w = shape
  image = _rgb(in_h, in_w)
  # The same rule as PyTorch's align_corners=False interpolation, as dense matrices.
  mh = torch_resize.linear_matrix(in_h, out_h).astype(np.float64)
  mw = torch_resize.linear_matrix(in_w, out_w).astype(np.float64)
  expected = np.einsum("oh,hwc,pw->opc", mh, image.astype(np.float64), mw)
  out = T.resize_image(image, out_h, out_w)
  assert out.dtype == np.uint8
  # OpenCV (what mmcv calls) rounds its weights to 11 bits: within 1 level everywhere, off
  # by one on ~10 % of the pixels.
  assert np.abs(out - np.floor(expected + 0.5)).max() <= 1
  assert (out == np.floor(expected + 0.5)).mean() > 0.8
  window = (3, out_h - 2, 5, out_w - 1)
  np.testing.assert_array_equal(T.resize_image(image, out_h, out_w, window=window),
                                out[3:out_h - 2, 5:out_w - 1])


def test_label_resize_is_opencv_nearest():
  label = np.arange(7 * 9, dtype=np.int32).reshape(7, 9)
  for out_h, out_w in ((7, 9), (13, 20), (3, 4), (20, 5)):
    rows = [min(int(np.floor(i * 7 / out_h)), 6) for i in range(out_h)]
    cols = [min(int(np.floor(j * 9 / out_w)), 8) for j in range(out_w)]
    np.testing.assert_array_equal(T.resize_label(label, out_h, out_w), label[rows][:, cols])


def _reference_crop_box(rng, label, crop, cat_max_ratio, ignore_index=IGNORE_LABEL):
  """mmseg RandomCrop, written out: offsets uniform in the margins, up to 10 re-draws while the
  crop has fewer than two classes or one class has cat_max_ratio or more of its pixels."""
  def draw():
    oy = rng.integers(0, max(label.shape[0] - crop[0], 0) + 1)
    ox = rng.integers(0, max(label.shape[1] - crop[1], 0) + 1)
    return oy, oy + crop[0], ox, ox + crop[1]
  box = draw()
  for _ in range(10):
    values, counts = np.unique(label[box[0]:box[1], box[2]:box[3]], return_counts=True)
    counts = counts[values != ignore_index]
    if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
      break
    box = draw()
  return box


def test_random_crop_cat_max_ratio_rule():
  label = np.zeros((40, 60), np.int32)  # Mostly class 0; a few places with two classes.
  label[5:15, 40:55] = 3
  label[30:40, :10] = IGNORE_LABEL
  accepted = 0
  for seed in range(60):
    box = T.choose_crop_box(np.random.default_rng(seed), label, (16, 16), 0.75)
    assert box == _reference_crop_box(np.random.default_rng(seed), label, (16, 16), 0.75)
    accepted += T.crop_is_varied(label[box[0]:box[1], box[2]:box[3]], 0.75)
  assert 0 < accepted < 60  # Both outcomes happen: the rule is really exercised.
  # A crop larger than the image keeps all of it (margins 0), to be padded later.
  image, crop = _random_crop(_rgb(10, 12), label[:10, :12], np.random.default_rng(0), (16, 16))
  assert image.shape == (10, 12, 3) and crop.shape == (10, 12)


def test_the_crop_test_can_leave_out_class_255_and_count_ignored_pixels():
  """The ADE20K-Full and COCO+LVIS rows: the reference's RandomCrop ignore_index is 255 on
  labels that ignore -1, so -1 is counted as a category and class 255 is not."""
  label = np.full((40, 60), 255, np.int32)
  label[:, 30:] = IGNORE_LABEL
  label[10:20, 5:25] = 7
  crop = np.full(300, IGNORE_LABEL, np.int32)
  crop[:40], crop[40:100] = 7, 255
  assert not T.crop_is_varied(crop, 0.75, ignore_label=255)  # -1 has 200 / 240.
  assert T.crop_is_varied(crop, 0.75)  # Default: 255 counts, -1 not: 60 / 100.
  outcomes = set()
  for seed in range(60):
    box = T.choose_crop_box(np.random.default_rng(seed), label, (16, 16), 0.75, 255)
    assert box == _reference_crop_box(np.random.default_rng(seed), label, (16, 16), 0.75, 255)
    outcomes.add(T.crop_is_varied(label[box[0]:box[1], box[2]:box[3]], 0.75, 255))
  assert outcomes == {True, False}


def test_flip_moves_image_and_label_together():
  label = np.random.default_rng(0).integers(0, 5, (6, 9)).astype(np.int32)
  image = np.repeat(label[..., None].astype(np.uint8) * 40, 3, axis=-1)
  flips = 0
  for seed in range(40):
    img, lab = T.random_flip(image, label, np.random.default_rng(seed), 0.5)
    np.testing.assert_array_equal(img[..., 0], lab.astype(np.uint8) * 40)
    flipped = not np.array_equal(lab, label)
    assert flipped == (np.random.default_rng(seed).random() < 0.5)
    if flipped:
      np.testing.assert_array_equal(lab, label[:, ::-1])
    flips += flipped
  assert 5 < flips < 35


def test_pad_values_and_normalize():
  image = _rgb(5, 7)
  norm = T.normalize(image, (120.0, 110.0, 100.0), (50.0, 60.0, 70.0))
  np.testing.assert_allclose(norm, (image - np.array([120, 110, 100])) / [50, 60, 70], rtol=1e-6)
  label = np.ones((5, 7), np.int32)
  img, lab = T.pad_to(norm, label, (8, 9))
  assert img.shape == (8, 9, 3) and lab.shape == (8, 9)
  np.testing.assert_array_equal(img[:5, :7], norm)
  assert (img[5:] == 0).all() and (img[:, 7:] == 0).all()
  assert (lab[5:] == IGNORE_LABEL).all() and (lab[:, 7:] == IGNORE_LABEL).all()


def test_hsv_matches_the_colour_model():
  rgb = _rgb(16, 16)
  hsv = T.rgb_to_hsv(rgb)
  for (r, g, b), (h, s, v) in zip(rgb.reshape(-1, 3)[:200], hsv.reshape(-1, 3)[:200]):
    eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    assert v == max(r, g, b) and abs(int(s) - es * 255) <= 0.5 + 1e-9
    assert min(abs(int(h) - eh * 180), 180 - abs(int(h) - eh * 180)) <= 1  # Rounded tables.
  # HSV -> RGB: the colour model in float64, times 255 and truncated as OpenCV's vectorised
  # 8-bit path; float32 can land on the other side of an integer, and the last few pixels
  # of a row take OpenCV's scalar path, which rounds.
  hsv = np.random.default_rng(1).integers(0, [180, 256, 256], (500, 3)).astype(np.uint8)
  expected = [np.floor(np.array(colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)) * 255 + 1e-9)
              for h, s, v in hsv.astype(int)]
  diff = np.abs(T.hsv_to_rgb(hsv).astype(int) - np.array(expected))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.95
  grey = np.full((2, 2, 3), 77, np.uint8)
  np.testing.assert_array_equal(T.hsv_to_rgb(T.rgb_to_hsv(grey)), grey)


class _ScriptedRng:
  """Stands in for np.random.Generator with the draws written out, to pin each branch."""

  def __init__(self, ints, uniforms):
    self.ints, self.uniforms = list(ints), list(uniforms)

  def integers(self, *args):
    return self.ints.pop(0)

  def uniform(self, lo, hi):
    value = self.uniforms.pop(0)
    assert lo <= value <= hi
    return value


def test_photometric_distortion_order_and_rules():
  image = _rgb(8, 8)
  pmd = T.PhotoMetricDistortion()
  f = image.astype(np.float32)
  # Brightness only (coin 1, delta 20.7), contrast last but skipped, no saturation, no hue.
  out = pmd(image, _ScriptedRng([1, 0, 0, 0, 0], [20.7]))
  np.testing.assert_array_equal(out, np.clip(f + 20.7, 0, 255).astype(np.uint8))
  # Contrast first (mode 1) then nothing else: x * alpha, clipped, truncated.
  out = pmd(image, _ScriptedRng([0, 1, 1, 0, 0], [1.37]))
  np.testing.assert_array_equal(out, np.clip(f * np.float32(1.37), 0, 255).astype(np.uint8))
  # Hue only: H shifted by -7 modulo 180 in OpenCV's HSV.
  out = pmd(image, _ScriptedRng([0, 0, 0, 1, -7, 0], []))
  hsv = T.rgb_to_hsv(image)
  hsv[..., 0] = (hsv[..., 0].astype(int) - 7) % 180
  np.testing.assert_array_equal(out, T.hsv_to_rgb(hsv))
  # Saturation then contrast last (mode 0): the order matters and is kept.
  out = pmd(image, _ScriptedRng([0, 0, 1, 0, 1], [0.6, 0.8]))
  hsv = T.rgb_to_hsv(image)
  hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(0.6), 0, 255).astype(np.uint8)
  expected = np.clip(T.hsv_to_rgb(hsv).astype(np.float32) * np.float32(0.8), 0, 255)
  np.testing.assert_array_equal(out, expected.astype(np.uint8))


def _config(photometric=True):
  return T.TrainTransform(crop_size=(32, 32), img_scale=(96, 32), ratio_range=(0.5, 2.0),
                          cat_max_ratio=0.75, flip_prob=0.5, photometric=photometric,
                          mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def test_train_transform_equals_the_transforms_in_sequence():
  """The fused resize-inside-the-crop gives what resize -> crop -> flip -> ... gives."""
  label = (np.arange(24 * 40).reshape(24, 40) // 37 % 5).astype(np.int32)
  record = {"image": _rgb(24, 40), "label": label}
  cfg = _config()
  for seed in range(8):
    out = cfg(record, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    scale = T.sample_scale(rng, cfg.img_scale, cfg.ratio_range)
    image, lab = _resize(record["image"], record["label"], scale)
    image, lab = _random_crop(image, lab, rng, cfg.crop_size, cfg.cat_max_ratio)
    image, lab = T.random_flip(image, lab, rng, cfg.flip_prob)
    image = T.PhotoMetricDistortion()(image, rng)
    image, lab = T.pad_to(T.normalize(image, cfg.mean, cfg.std), lab, cfg.crop_size)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["label"], lab)
    assert out["image"].shape == (32, 32, 3) and out["label"].dtype == np.int32


def test_photometric_leaves_labels_alone():
  label = (np.arange(24 * 40).reshape(24, 40) // 29 % 4).astype(np.int32)
  record = {"image": _rgb(24, 40), "label": label}
  for seed in range(5):
    with_pmd = _config(True)(record, np.random.default_rng(seed))
    without = _config(False)(record, np.random.default_rng(seed))
    np.testing.assert_array_equal(with_pmd["label"], without["label"])
