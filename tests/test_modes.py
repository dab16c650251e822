"""Evaluation wiring: the evaluators of a config, the +GT oracle seeing each whole image's
class set, one trace of the forward per run, params-only restores, the removed eval fields refused."""

import functools
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlseg_jax import errors
from mlseg_jax import optimizer as optim_lib
from mlseg_jax import pretrained
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import train
from mlseg_jax.checkpoints import DAMAGED_DIR
from mlseg_jax.evaluation import evaluators
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax.evaluation import modes
from mlseg_jax.evaluation import runner
from mlseg_jax.main import validate_config
from mlseg_jax.param_tree import flatten
from test_train import random_batches, tiny_train_config


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


def _eval_config(decoder="mask_transformer", **train_overrides):
  config = tiny_train_config(decoder=decoder, **train_overrides)
  config.eval.stride = (64, 64)
  config.eval.max_images = 2
  return config


def test_oracle_evaluation_predicts_only_each_images_classes():
  config = _eval_config(decoder="mlseg_gt")
  config.data.test_scale = (96, 64)
  config.eval.stride = (48, 48)
  model = train.build_model(config.model)
  images, labels = train.sample_inputs(config)
  params = model.init(jax.random.PRNGKey(0), images, labels=labels)["params"]
  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:2])
  dataset = types.SimpleNamespace(mean=(120.0,) * 3, std=(60.0,) * 3,
                                  class_names=[f"c{i}" for i in range(11)])
  records = _records()
  # Both images in one batch: each window still sees its own image's set.
  evaluator = evaluators.SingleScale(evaluators.make_predict_fn(config.model), config,
                                     records, dataset, mesh)
  results = dict(evaluator.run(params))
  assert results["num_images"] == 2
  present = {1, 3, 7, 9}
  for name, iou in results["IoU"].items():
    assert math.isnan(iou) == (int(name[1:]) not in present), (name, iou)

  # Image by image, with the set fixed by hand: the same confusion as the evaluator's.
  total = np.zeros((11, 11), np.int64)
  for record, classes in zip(records, [(1, 3), (3, 7, 9)]):
    present_set = np.isin(np.arange(11), classes)

    def fn(w, present_set=present_set):
      lab = jnp.broadcast_to(present_set, (w.shape[0], 11))
      return model.apply({"params": params}, w, labels=lab)["logits"]

    image_confusion = sum(
        batch.confusion for batch in runner.segment(
            fn, [record], evaluator.settings, num_classes=11, mesh=mesh,
            data_axis=sharding_lib.BATCH_AXES))
    # Only the image's own classes are ever predicted.
    assert image_confusion[:, [c for c in range(11) if c not in classes]].sum() == 0
    assert image_confusion[:, list(classes)].sum() > 0
    total += image_confusion
  np.testing.assert_allclose(results["mIoU"],
                             metrics_lib.segmentation_metrics(total)["mIoU"])


class _CountingModel:
  """A model whose `apply` counts its calls: under jit, the traces of the forward."""

  def __init__(self, model):
    self.model, self.traces = model, 0

  def apply(self, *args, **kwargs):
    self.traces += 1
    return self.model.apply(*args, **kwargs)


def test_a_second_periodic_evaluation_does_not_trace_the_forward_again(tmp_path, monkeypatch):
  config = _eval_config()
  config.eval.run = ("ss", "ms_flip")
  config.eval.scales = (0.75, 1.0)
  config.eval.flip = False
  model = train.build_model(config.model)
  counting = _CountingModel(model)
  monkeypatch.setattr(evaluators, "build_model", lambda _: counting)
  mesh = sharding_lib.make_mesh(config.mesh)
  images, labels = train.sample_inputs(config)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, labels=labels)["params"],
                   out_shardings=sharding_lib.replicated(mesh))()
  evaluate_fn = modes.periodic_eval_fn(config, tmp_path)
  first = evaluate_fn(params, 1)
  traces = counting.traces
  assert traces >= 1
  second = evaluate_fn(jax.tree_util.tree_map(lambda p: p * 1.0, params), 2)
  assert counting.traces == traces  # The same compiled forward, new parameters.
  assert first == second and set(first) == {f"{kind}/{k}" for kind in ("ss", "ms_flip")
                                             for k in ("aAcc", "mIoU", "mAcc")}
  for kind in ("ss", "ms_flip"):
    assert (tmp_path / "eval" / f"step_2_{kind}.json").is_file()


def test_eval_restores_the_parameters_alone_and_falls_back_past_a_damaged_step(
    tmp_path, monkeypatch):
  config = _eval_config(total_steps=4, checkpoint_every=2)
  state, _ = train.train(config, tmp_path, data_iter=random_batches(5))

  def no_optimizer(*args, **kwargs):
    raise AssertionError("evaluation built an optimizer")

  monkeypatch.setattr(optim_lib, "make_optimizer", no_optimizer)
  mesh = sharding_lib.make_mesh(config.mesh)
  params, source = modes.load_params_for_eval(config, tmp_path, mesh)
  assert source == str(tmp_path / "checkpoints" / "4")
  want = flatten(jax.device_get(state.params))
  got = flatten(jax.device_get(params))
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))

  step_2 = flatten(pretrained.load_params(tmp_path / "checkpoints" / "2"))
  (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").unlink()
  params, source = modes.load_params_for_eval(config, tmp_path, mesh)
  assert source == str(tmp_path / "checkpoints" / "2")
  assert (tmp_path / DAMAGED_DIR / "4").is_dir()
  got = flatten(jax.device_get(params))
  for path in step_2:
    np.testing.assert_array_equal(got[path], step_2[path], err_msg="/".join(path))


@pytest.mark.parametrize("old,new", [("multi_scale", "run"),
                                     ("windows_per_batch", "windows_per_call")])
def test_removed_eval_fields_are_refused_naming_their_successor(old, new):
  config = _eval_config()
  with pytest.raises(AttributeError) as refused:
    setattr(config.eval, old, 3)
  assert errors.describe_flag_error(refused.value, ["main", f"--config.eval.{old}=3"]) == (
      f"config.eval.{old} is not a config field; did you mean config.eval.{new}?")
  # Set in a config file: the same line, on the field's own name.
  assert errors.describe_flag_error(refused.value, ["main"]) == (
      f"eval.{old} is not a config field; did you mean eval.{new}?")


def test_unknown_evaluators_are_refused():
  config = _eval_config()
  config.eval.run = ("ss", "msflip")
  with pytest.raises(ValueError, match="eval.run: 'msflip' is not an evaluator"):
    validate_config(config, num_devices=1)
  config.eval.run = ("ss",)
  config.eval.windows_per_call = 0
  with pytest.raises(ValueError, match="eval.windows_per_call=0 must be positive"):
    validate_config(config, num_devices=1)
  config.eval.windows_per_call, config.eval.min_windows_per_call = 4, 8
  with pytest.raises(ValueError, match="eval.min_windows_per_call=8 is more than "
                                       "eval.windows_per_call=4"):
    validate_config(config, num_devices=1)


def _tensorboard_events(directory):
  """(tag, step, value or the image's (height, width)) of every summary under a directory."""
  import io
  import struct

  from PIL import Image
  from tensorboardX.proto import event_pb2

  out = []
  for f in sorted(directory.glob("events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i < len(data):  # TFRecord: length, its crc, payload, its crc.
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      for v in event.summary.value:
        value = (Image.open(io.BytesIO(v.image.encoded_image_string)).size[::-1]
                 if v.HasField("image") else v.simple_value)
        out.append((v.tag, event.step, value))
      i += 16 + n
  return out


def test_an_evaluation_writes_its_confusion_matrix_and_pictures_and_sends_them_to_tensorboard(
    tmp_path):
  from PIL import Image

  from mlseg_jax import tracking
  from mlseg_jax.tensorboard import open_summary_writer

  config = _eval_config(decoder="mlseg")
  mesh = sharding_lib.make_mesh(config.mesh)
  model = train.build_model(config.model)
  images, labels = train.sample_inputs(config)
  params = model.init(jax.random.PRNGKey(0), images, labels=labels)["params"]
  (evaluator,) = evaluators.build_evaluators(config, mesh)
  tracker = tracking.Tracker(open_summary_writer(tmp_path / "tb"))
  palette = modes.data_lib.dataset_info(config.data).palette
  scalars = modes.evaluate_params([evaluator], params, workdir=tmp_path, step=7,
                                              tracker=tracker, sample_images=1,
                                              palette=palette)
  tracker.close()
  results = json.loads((tmp_path / "eval" / "step_7_ss.json").read_text())
  confusion = np.load(tmp_path / "eval" / "step_7_ss_confusion.npy")
  assert confusion.dtype == np.int64 and confusion.shape == (11, 11)

  # The matrix is the evaluation's own: per-image predictions against the labels ...
  want = np.zeros((11, 11), np.int64)
  for batch in runner.segment(functools.partial(evaluator.predict_fn, params),
                                    evaluator.records, evaluator.settings, num_classes=11,
                                    topk=config.model.topk, keep_predictions=True):
    for r in batch.images:
      label = evaluator.records[r.index]["label"]
      valid = label >= 0
      np.add.at(want, (label[valid], r.prediction[valid]), 1)
  np.testing.assert_array_equal(confusion, want)
  # ... summing to the labelled pixels, its diagonal the intersections behind IoU and Acc.
  assert confusion.sum() == results["labelled_pixels"]
  names = list(results["IoU"])
  for c, name in enumerate(names):
    label_area, pred_area, inter = confusion[c].sum(), confusion[:, c].sum(), confusion[c, c]
    if label_area:
      assert inter == round(results["Acc"][name] * label_area)
    if label_area + pred_area:
      assert results["IoU"][name] == pytest.approx(inter / (label_area + pred_area - inter))

  for kind in ("confusion", "iou"):
    picture = np.asarray(Image.open(tmp_path / "eval" / f"step_7_ss_{kind}.png"))
    assert min(picture.shape[:2]) >= 300 and picture.std() > 0
  events = _tensorboard_events(tmp_path / "tb")
  pictures = {tag: size for tag, step, size in events if step == 7}
  assert set(pictures) == {"eval/ss/confusion", "eval/ss/iou", "eval/ss/sample_0"}
  assert pictures["eval/ss/iou"] == Image.open(tmp_path / "eval" / "step_7_ss_iou.png").size[::-1]
  # The sample: the truth and the prediction side by side at the image's size (360 rows,
  # under SAMPLE_HEIGHT), and the legend.
  h, w = evaluator.records[0]["image"].shape[:2]
  assert pictures["eval/ss/sample_0"][0] >= h and pictures["eval/ss/sample_0"][1] > 2 * w
  assert set(scalars) >= {"ss/mIoU", "ss/mAP"}
