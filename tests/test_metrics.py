"""Confusion-matrix metrics against mmseg's per-image formulas, cross-host sums, MLSeg AP."""

import json
import math

import numpy as np
import pytest

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.evaluation import metrics as metrics_lib

NAMES = ["sky", "road", "car", "tree", "person", "bike"]


def mmseg_areas(preds, labels, num_classes):
  """mmseg's intersect_and_union summed over images: histograms of the valid pixels."""
  total = np.zeros((4, num_classes))
  for pred, label in zip(preds, labels):
    valid = label != IGNORE_LABEL
    pred, label = pred[valid], label[valid]
    hist = lambda x: np.bincount(x, minlength=num_classes)[:num_classes]
    inter = hist(pred[pred == label])
    area_pred, area_label = hist(pred), hist(label)
    total += [inter, area_pred + area_label - inter, area_pred, area_label]
  return total


def confusion_of(preds, labels, num_classes):
  cm = np.zeros((num_classes, num_classes), np.int64)
  for pred, label in zip(preds, labels):
    valid = label != IGNORE_LABEL
    np.add.at(cm, (label[valid], pred[valid]), 1)
  return cm


def random_maps(seed, n=4, num_classes=6):
  """Predictions and labels where class 5 never occurs and class 4 is only predicted."""
  rng = np.random.default_rng(seed)
  preds, labels = [], []
  for _ in range(n):
    h, w = rng.integers(5, 30, 2)
    label = rng.integers(0, 4, (h, w))
    label[rng.random((h, w)) < 0.3] = IGNORE_LABEL
    pred = np.where(rng.random((h, w)) < 0.6, np.maximum(label, 0), rng.integers(0, 5, (h, w)))
    preds.append(pred)
    labels.append(label)
  return preds, labels


def test_metrics_match_mmseg_with_ignore_and_absent_classes():
  preds, labels = random_maps(0)
  got = metrics_lib.segmentation_metrics(confusion_of(preds, labels, 6), NAMES)
  inter, union, _, area_label = mmseg_areas(preds, labels, 6)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = inter / union, inter / area_label
  assert got["aAcc"] == pytest.approx(inter.sum() / area_label.sum())
  assert got["mIoU"] == pytest.approx(np.nanmean(iou))
  assert got["mAcc"] == pytest.approx(np.nanmean(acc))
  # "bike" (5): no label, no prediction -> NaN, left out of the means.
  assert math.isnan(got["IoU"]["bike"]) and math.isnan(got["Acc"]["bike"])
  # "person" (4): predicted, never labelled -> IoU 0 counts in mIoU, Acc NaN does not.
  assert got["IoU"]["person"] == 0.0 and math.isnan(got["Acc"]["person"])
  assert got["mIoU"] == pytest.approx(np.mean([got["IoU"][n] for n in NAMES[:5]]))
  assert got["mAcc"] == pytest.approx(np.mean([got["Acc"][n] for n in NAMES[:4]]))
  assert got["labelled_pixels"] == sum(int((l != IGNORE_LABEL).sum()) for l in labels)


def encoded_by_host(counts):
  """What a host hands to the allgather for `counts` (run the function under test on it)."""
  out = []
  metrics_lib.sum_across_hosts(counts, lambda x: out.append(x) or x[None])
  return out[0]


def test_confusion_sum_over_two_simulated_hosts_is_exact_beyond_int32():
  preds, labels = random_maps(1, n=6)
  big = np.int64(3_000_000_000)  # Each host's counts beyond 2^31, the sums beyond 2^32.
  host0 = confusion_of(preds[0::2], labels[0::2], 6) * big
  host1 = confusion_of(preds[1::2], labels[1::2], 6) * big
  # Host 0's view: the allgather returns its own halves and host 1's.
  total = metrics_lib.sum_across_hosts(host0, lambda x: np.stack([x, encoded_by_host(host1)]))
  assert total.dtype == np.int64 and total.max() > 2 ** 32
  np.testing.assert_array_equal(total, confusion_of(preds, labels, 6) * big)
  with pytest.raises(TypeError, match="int64"):
    metrics_lib.sum_across_hosts(host0.astype(np.int32))


def test_float_sum_over_hosts_keeps_float64_precision():
  a = np.array([1e9 + 0.123456789, 3.5])
  b = np.array([2e-7, 1e8 + 0.5])
  encoded_b = []
  metrics_lib.sum_floats_across_hosts(b, lambda x: encoded_b.append(x) or x[None])
  got = metrics_lib.sum_floats_across_hosts(a, lambda x: np.stack([x, encoded_b[0]]))
  assert abs(float(np.float32(a[0])) - a[0]) > 1e-3  # float32 alone would lose this
  np.testing.assert_allclose(got, a + b, rtol=1e-13)


def reference_average_precision(scores, present):
  """The reference's get_average_precision for one image, step by step."""
  order = np.argsort(-scores, kind="stable")
  inverted = np.full(len(scores), np.inf)
  inverted[order] = np.arange(len(scores))
  v = np.sort(inverted[present])
  return (np.arange(1, len(v) + 1) / (v + 1)).sum() / present.sum()


def test_average_precision_matches_reference_and_a_hand_example():
  assert metrics_lib.average_precision(np.array([0.9, 0.1, 0.5, 0.3]),
                                       np.array([0, 1, 1, 0], bool)) == pytest.approx(0.5)
  rng = np.random.default_rng(2)
  for _ in range(20):
    scores = rng.normal(size=30)
    present = rng.random(30) < 0.2
    present[rng.integers(30)] = True
    assert metrics_lib.average_precision(scores, present) == pytest.approx(
        reference_average_precision(scores, present))
  assert math.isnan(metrics_lib.average_precision(np.zeros(3), np.zeros(3, bool)))


def test_multilabel_recall_precision_and_images_without_labels():
  m = metrics_lib.MultiLabelMetrics()
  # Present classes 0 (10 px) and 2 (30 px); selected 2 and 3.
  m.add(np.array([0.1, 0.0, 0.9, 0.5]), np.array([0, 0, 1, 1], bool),
        np.array([10, 0, 30, 0]))
  m.add(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 1, 0, 0], bool), np.zeros(4, int))
  out = m.summary()
  assert out["recall"] == pytest.approx(0.5)
  assert out["pixel_recall"] == pytest.approx(0.75)
  assert out["precision"] == pytest.approx((0.5 + 0.0) / 2)  # 2nd image: nothing present
  assert out["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # ranks of 2 and 0: 0 and 2
  assert out["images"] == 1


def test_results_written_as_json_and_table(tmp_path):
  preds, labels = random_maps(3)
  results = metrics_lib.segmentation_metrics(confusion_of(preds, labels, 6), NAMES)
  results["multilabel"] = {"mAP": 0.5, "recall": 0.25, "pixel_recall": 0.75,
                           "precision": 0.125, "images": 4, "topk": 2}
  path = metrics_lib.write_results(results, tmp_path / "out", "ss")
  loaded = json.loads(path.read_text())
  assert loaded["mIoU"] == pytest.approx(results["mIoU"])
  assert loaded["IoU"]["bike"] is None  # NaN -> null
  table = (tmp_path / "out" / "ss.txt").read_text()
  for name in NAMES:
    assert name in table
  assert f"{100 * results['mIoU']:5.2f}" in table and "nan" in table
  scalars = metrics_lib.tensorboard_scalars(results, "val")
  assert scalars["val/mIoU"] == pytest.approx(results["mIoU"])
  assert scalars["val/mAP"] == 0.5 and "val/IoU" not in scalars


def test_the_confusion_matrix_is_written_beside_the_results_with_mmsegs_intersections(
    tmp_path):
  preds, labels = random_maps(5)
  results = metrics_lib.segmentation_metrics(confusion_of(preds, labels, 6), NAMES)
  metrics_lib.write_results(results, tmp_path, "ss")
  confusion = np.load(tmp_path / "ss_confusion.npy")
  assert confusion.dtype == np.int64 and confusion.shape == (6, 6)
  inter, _, area_pred, area_label = mmseg_areas(preds, labels, 6)
  # Rows = ground truth, columns = prediction, ignored pixels left out.
  np.testing.assert_array_equal(np.diag(confusion), inter)
  np.testing.assert_array_equal(confusion.sum(1), area_label)
  np.testing.assert_array_equal(confusion.sum(0), area_pred)
  assert confusion.sum() == results["labelled_pixels"] == sum(
      int((l != IGNORE_LABEL).sum()) for l in labels)
  assert "confusion" not in json.loads((tmp_path / "ss.json").read_text())
