"""Evaluation wiring: the +GT oracle sees each whole image's class set."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np

from mlseg_jax import evaluate as evaluate_lib
from mlseg_jax import evaluation_runner
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import train
from test_train import tiny_train_config


def _records():
  rng = np.random.default_rng(0)
  out = []
  for i, (h, w, classes) in enumerate([(72, 96, (1, 3)), (90, 60, (3, 7, 9))]):
    label = np.asarray(classes, np.int32)[rng.integers(0, len(classes), (-(-h // 8), -(-w // 8)))]
    label = label.repeat(8, 0).repeat(8, 1)[:h, :w]
    label[:4] = -1
    out.append({"image": rng.integers(0, 255, (h, w, 3)).astype(np.uint8), "label": label,
                "name": f"im{i}"})
  return out


def test_oracle_evaluation_predicts_only_each_images_classes():
  config = tiny_train_config(decoder="mlseg_gt")
  config.data.test_scale = (96, 64)
  config.eval.stride = (48, 48)
  model = train.build_model(config.model)
  images, labels = train.sample_inputs(config)
  params = model.init(jax.random.PRNGKey(0), images, labels=labels)["params"]
  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:2])
  dataset = types.SimpleNamespace(mean=(120.0,) * 3, std=(60.0,) * 3,
                                  class_names=[f"c{i}" for i in range(11)])
  records = _records()
  results = evaluation_runner.evaluate_oracle(config, params, mesh, records, dataset)
  assert results["num_images"] == 2
  present = {1, 3, 7, 9}
  for name, iou in results["IoU"].items():
    assert math.isnan(iou) == (int(name[1:]) not in present), (name, iou)

  # Image by image, with the set fixed by hand: the same confusion as the runner's.
  s = evaluation_runner._settings(config)
  settings = evaluate_lib.EvalSettings(mean=dataset.mean, std=dataset.std,
                                       test_scale=s["test_scale"], crop=s["crop"],
                                       stride=s["stride"])
  total = np.zeros((11, 11), np.int64)
  for record, classes in zip(records, [(1, 3), (3, 7, 9)]):
    present_set = np.isin(np.arange(11), classes)

    def fn(w, present_set=present_set):
      lab = jnp.broadcast_to(present_set, (w.shape[0], 11))
      return model.apply({"params": params}, w, labels=lab)["logits"]

    image_confusion = sum(
        batch.confusion for batch in evaluate_lib.segment(
            fn, [record], settings, num_classes=11, mesh=mesh, data_axis=sharding_lib.BATCH_AXES))
    # Only the image's own classes are ever predicted.
    assert image_confusion[:, [c for c in range(11) if c not in classes]].sum() == 0
    assert image_confusion[:, list(classes)].sum() > 0
    total += image_confusion
  np.testing.assert_allclose(results["mIoU"],
                             evaluate_lib.metrics_lib.segmentation_metrics(total)["mIoU"])
