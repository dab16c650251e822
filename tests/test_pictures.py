"""Pictures of an evaluation: the row-normalised confusion heatmap and the IoU bars."""

import numpy as np

from mlseg_jax.evaluation import pictures
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax.data.classes import CAMVID_CLASSES, CAMVID_PALETTE


def _confusion(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 20, (n, n)) + np.diag(rng.integers(100, 2000, n))


def _colours(picture):
  return {tuple(c) for c in picture.reshape(-1, 3)}


def test_the_pictures_of_camvid_results_show_every_class_in_its_palette_colour():
  confusion = _confusion(11)
  confusion[4] = 0  # A class never labelled: a grey row, and IoU 0 if it is predicted.
  results = metrics_lib.segmentation_metrics(confusion, CAMVID_CLASSES)
  drawn = pictures.pictures(results, palette=CAMVID_PALETTE, title="ss, step 3")
  assert set(drawn) == {"confusion", "iou"}
  for picture in drawn.values():
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert min(picture.shape[:2]) >= 300 and picture.std() > 0
  # Each class's bar is filled with its palette colour (those with an IoU above zero).
  colours = _colours(drawn["iou"])
  for name, colour in zip(CAMVID_CLASSES, CAMVID_PALETTE):
    if results["IoU"][name] > 0.01:
      assert tuple(colour) in colours, name
  # The unlabelled class's row is grey across the whole matrix.
  heatmap = drawn["confusion"].astype(int)
  grey = (np.ptp(heatmap, axis=-1) == 0) & (abs(heatmap[..., 0] - 221) <= 2)
  assert grey.sum() > 1000


def test_many_classes_show_the_most_confused_ones():
  confusion = _confusion(150)
  confusion[:, 7] += 500  # Class 7 takes many pixels of the others ...
  confusion[9, :] += 400  # ... and class 9's pixels go everywhere.
  shown = pictures.most_confused(confusion, pictures.MAX_HEATMAP_CLASSES)
  assert len(shown) == pictures.MAX_HEATMAP_CLASSES and 7 in shown and 9 in shown
  assert list(shown) == sorted(shown)
  names = [f"class {i}" for i in range(150)]
  picture = pictures.confusion_picture(confusion, names)
  big = pictures.iou_picture(metrics_lib.segmentation_metrics(confusion, names)["IoU"])
  for p in (picture, big):
    assert p.std() > 0 and max(p.shape[:2]) <= 2000  # Readable, bounded whatever the count.
