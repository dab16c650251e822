"""A whole evaluation on the three ADE20K samples against the reference's per-image procedure
written out directly (mmseg 0.17 `MultiScaleFlipAug` + `EncoderDecoder.slide_inference` /
`aug_test`, mmcv 1.4's image ops): OpenCV keep-ratio resize of the uint8 image, flip after
it, mmcv's Normalize, the model on each window at the window's own shape, count-averaging of
overlapping windows, `F.interpolate` (bilinear, align_corners=False) to the original size,
softmax summed over scales and flips, argmax. The same tiny ViT on both sides; the
predictions must be the reference's."""


import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SHARED_DATA, tiny_model_config
from mlseg_jax import IGNORE_LABEL
from mlseg_jax.evaluation import batching
from mlseg_jax.evaluation import device
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import runner
from mlseg_jax.evaluation.evaluators import make_predict_fn
from mlseg_jax.models.segmenter import build_model

ADE = SHARED_DATA / "ade20k_samples" / "ADEChallengeData2016"
C = 8  # ADE20K's labels folded onto 8 classes: a tiny model, the same label structure.
HALF = (127.5, 127.5, 127.5)  # ADE20K's normalisation
# The ADE20K geometry at half size (test scale (2048, 512), crop 512 -> (1024, 256), 256), with
# a stride below the crop so that windows overlap and mmseg's count map matters.
GEOMETRY = dict(mean=HALF, std=HALF, test_scale=(1024, 256), crop=(256, 256),
                stride=(171, 171), patch_size=16)


def ade_samples():
  """The samples as the reference's pipeline has them: RGB uint8 image, and the label after
  reduce_zero_label (uint8, 255 = ignore), here folded modulo C. The first label gets one
  pixel of a class it lacks, which no nearest resize to a test scale below 1 picks."""
  images = sorted((ADE / "images" / "validation").glob("*.jpg"))
  if not images:
    pytest.skip(f"no ADE20K samples under {ADE}")
  out = []
  for path in images:
    raw = np.asarray(Image.open(ADE / "annotations" / "validation" / f"{path.stem}.png"))
    label = np.where(raw == 0, 255, (raw.astype(np.int64) - 1) % C).astype(np.uint8)
    out.append((path.stem, np.asarray(Image.open(path).convert("RGB")), label))
  label = out[0][2]
  label[1, 1] = np.setdiff1d(np.arange(C), label)[0]
  return out


def records_of(samples):
  return [{"image": image, "name": name,
           "label": np.where(label == 255, IGNORE_LABEL, label.astype(np.int32))}
          for name, image, label in samples]


def mmcv_normalize(img, mean, std):
  """mmcv.imnormalize_: float32 image, cv2.subtract of the mean, cv2.multiply by 1 / std."""
  img = img.astype(np.float32)
  cv2.subtract(img, np.float64(np.asarray(mean).reshape(1, -1)), img)
  cv2.multiply(img, 1 / np.float64(np.asarray(std).reshape(1, -1)), img)
  return img


def interpolate(x, size):
  """mmseg's `resize`: F.interpolate bilinear, align_corners=False, of (C, H, W)."""
  return F.interpolate(torch.from_numpy(x)[None], size=tuple(size), mode="bilinear",
                       align_corners=False)[0].numpy()


def reference_scores(apply, image, label, s: geometry.EvalSettings, gt: bool):
  """The reference's summed probabilities (C, H, W) of one image, window by window."""
  h, w = image.shape[:2]
  (ch, cw), (sh, sw) = s.crop, s.stride
  total = 0.0
  for scale in s.scales:
    hs, ws = geometry.rescale_size(h, w, scale)  # mmcv.imrescale's size rule
    resized = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(label, (ws, hs), interpolation=cv2.INTER_NEAREST)
    # The oracle's histc over [0, C - 1] of the resized label (255 falls outside).
    classes = np.bincount(seg[seg < C].ravel(), minlength=C)[None] > 0
    for flip in s.flips:
      img = mmcv_normalize(resized[:, ::-1] if flip else resized, s.mean, s.std)
      preds, count = np.zeros((C, hs, ws), np.float32), np.zeros((hs, ws), np.float32)
      for i in range(max(hs - ch + sh - 1, 0) // sh + 1):
        for j in range(max(ws - cw + sw - 1, 0) // sw + 1):
          y2, x2 = min(i * sh + ch, hs), min(j * sw + cw, ws)
          y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
          logits = apply(img[None, y1:y2, x1:x2], classes if gt else None)  # (1, gh, gw, C)
          logits = np.ascontiguousarray(np.asarray(logits[0]).transpose(2, 0, 1))
          preds[:, y1:y2, x1:x2] += interpolate(logits, (y2 - y1, x2 - x1))
          count[y1:y2, x1:x2] += 1
      out = torch.softmax(torch.from_numpy(interpolate(preds / count, (h, w))), 0).numpy()
      total = total + (out[:, :, ::-1] if flip else out)
  return total


@pytest.fixture(scope="module")
def tiny_models():
  """Per decoder: our evaluation's logits_fn (the jitted forward of evaluators.py) and the
  reference side's per-window call, model.apply at the window's own shape."""
  models = {}
  for decoder in ("mask_transformer", "mlseg_gt", "mlseg"):
    config = tiny_model_config(decoder=decoder, num_classes=C, topk=4)
    model = build_model(config)
    rngs = {"params": jax.random.key(3), "dropout": jax.random.key(4)}
    params = jax.jit(lambda x, y, m=model: m.init(rngs, x, labels=y))(
        np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 64, 64), np.int32))["params"]
    predict = make_predict_fn(config)

    @jax.jit
    def apply(x, classes, model=model, params=params):
      kw = {} if classes is None else {"labels": classes}
      return model.apply({"params": params}, x, train=False, **kw)["logits"]

    models[decoder] = (lambda *a, p=params, f=predict, **kw: f(p, *a, **kw)), apply
  return models


def assert_reference_predictions(logits_fn, apply, s, gt, topk=None):
  samples = ade_samples()
  got = {}
  for batch in runner.segment(logits_fn, records_of(samples), s, num_classes=C, gt_classes=gt,
                              keep_predictions=True, topk=topk,
                              batching=batching.Batching(images_per_batch=2)):
    for r in batch.images:
      got[r.name] = r.prediction
  for name, image, label in samples:
    want = reference_scores(apply, image, label, s, gt)
    top2 = np.sort(want, axis=0)[-2:]
    # Pixels where the reference's two best classes are a float32 tie may go either way.
    decided = top2[1] - top2[0] > 1e-5
    assert decided.mean() > 0.999
    np.testing.assert_array_equal(got[name][decided], want.argmax(0)[decided])


@pytest.mark.slow
def test_single_scale_evaluation_is_the_reference_on_ade20k_samples(tiny_models):
  logits_fn, apply = tiny_models["mask_transformer"]
  assert_reference_predictions(logits_fn, apply, geometry.EvalSettings(**GEOMETRY), gt=False)


@pytest.mark.slow
def test_multiscale_flip_evaluation_is_the_reference_on_ade20k_samples(tiny_models):
  """Ratios 0.5 and 0.75 give images smaller than the window: the model runs on them at
  their own size (rounded up to the patch by the ViT's padding), as mmseg does."""
  logits_fn, apply = tiny_models["mask_transformer"]
  s = geometry.EvalSettings(**GEOMETRY, ratios=geometry.MS_RATIOS, flip=True)
  assert_reference_predictions(logits_fn, apply, s, gt=False)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["mask_transformer", "mlseg"])
def test_masked_padding_evaluation_is_the_reference_on_ade20k_samples(tiny_models, decoder):
  """The small windows of ratios 0.5 and 0.75 run padded to the crop, their padding
  hidden from attention and MLSeg's pooling, their position embedding resized to their
  own grid: the reference's predictions from windows of one shape."""
  logits_fn, apply = tiny_models[decoder]
  s = geometry.EvalSettings(**GEOMETRY, ratios=(0.5, 0.75, 1.0), flip=True, masked_padding=True)
  shapes = set()

  def recording(windows, **kw):
    shapes.add(windows.shape[1:3])
    assert kw["valid_grid"].shape == (windows.shape[0], 2)
    return logits_fn(windows, **kw)

  assert_reference_predictions(recording, apply, s, gt=False,
                               topk=4 if decoder == "mlseg" else None)
  assert shapes == {s.crop}


@pytest.mark.slow
def test_gt_oracle_takes_each_scales_resized_label_set(tiny_models):
  """+GT: each scale's windows get the class set of the label nearest-resized to that scale
  (the reference resizes the label with the image before its oracle sees it); at ratio 0.5
  some sample loses a class that the original label has."""
  samples = ade_samples()
  s = geometry.EvalSettings(**GEOMETRY, ratios=(0.5, 1.0), flip=True)
  lost = False
  for _, image, label in samples:
    for scale in s.scales:
      hs, ws = geometry.rescale_size(*label.shape, scale)
      seg = cv2.resize(label, (ws, hs), interpolation=cv2.INTER_NEAREST)
      lost |= set(np.unique(seg)) != set(np.unique(label))
  assert lost  # the test can tell the two class sets apart
  logits_fn, apply = tiny_models["mlseg_gt"]
  assert_reference_predictions(logits_fn, apply, s, gt=True)


def test_normalisation_is_mmcvs_bit_for_bit():
  levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
  for mean, std in [(HALF, HALF), ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))]:
    table = device.normalise_table(mean, std)
    got = table[np.arange(3), levels.astype(np.int64)]
    np.testing.assert_array_equal(got, mmcv_normalize(levels, mean, std))
