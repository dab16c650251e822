"""Prediction pictures: input-sized masks in the palette's colours, overlays, MLSeg classes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import predict
from mlseg_jax.evaluation import runner

PATCH = 8
PALETTE = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
NAMES = ["red thing", "green thing", "blue thing"]
GEOMETRY = dict(test_scale=(64, 32), crop=(32, 32), stride=(24, 24), patch_size=PATCH)
SETTINGS = geometry.EvalSettings(mean=(0, 0, 0), std=(1, 1, 1), **GEOMETRY)


def colour_model(topk=None):
  """Class = dominant colour channel of each patch (mean 0, std 1: raw pixel values)."""

  @jax.jit
  def logits_fn(x):
    n, h, w, _ = x.shape
    gh, gw = -(-h // PATCH), -(-w // PATCH)
    x = jnp.pad(x, ((0, 0), (0, gh * PATCH - h), (0, gw * PATCH - w), (0, 0)))
    logits = x.reshape(n, gh, PATCH, gw, PATCH, 3).mean((2, 4)) / 255.0
    if topk is None:
      return logits
    image_logits = logits.mean((1, 2)) * 4 - 1
    keep = jax.nn.one_hot(jax.lax.top_k(image_logits, topk)[1], 3).sum(1) > 0
    return {"logits": jnp.where(keep[:, None, None], logits, -100.0),
            "image_logits": image_logits}

  return logits_fn


def two_colour_image(h, w):
  image = np.zeros((h, w, 3), np.uint8)
  image[:, : w // 2, 0] = 230  # left red
  image[:, w // 2:, 2] = 230  # right blue
  return image


@pytest.fixture
def image_dir(tmp_path):
  d = tmp_path / "images"
  d.mkdir()
  Image.fromarray(two_colour_image(45, 100)).save(d / "wide.png")  # larger than the window
  Image.fromarray(two_colour_image(20, 26)).save(d / "small.png")  # smaller than the window
  Image.fromarray(two_colour_image(50, 30)[..., 0]).save(d / "gray.png")  # mode L
  (d / "notes.txt").write_text("not an image")
  return d


def test_predict_writes_input_sized_palette_masks_and_overlays(image_dir, tmp_path):
  out_dir = tmp_path / "out"
  written = predict.predict_images(
      colour_model(), image_dir, out_dir, SETTINGS, palette=PALETTE, class_names=NAMES)
  assert sorted(w["image"].split("/")[-1] for w in written) == ["gray.png", "small.png",
                                                                "wide.png"]
  palette = np.asarray(PALETTE, np.uint8)
  for w in written:
    source = np.asarray(Image.open(w["image"]).convert("RGB"))
    mask = np.asarray(Image.open(w["mask"]))
    over = np.asarray(Image.open(w["overlay"]))
    assert mask.shape == over.shape == source.shape
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in PALETTE}
    np.testing.assert_array_equal(
        over, np.round(0.5 * source.astype(float) + 0.5 * mask.astype(float)).astype(np.uint8))
    if "gray" not in w["image"]:  # red left quarter, blue right quarter
      q = source.shape[1] // 4
      assert (mask[:, :q] == palette[0]).all() and (mask[:, -q:] == palette[2]).all()
    assert "classes" not in w  # not an MLSeg model
  # The mask is exactly the evaluation's prediction, coloured.
  records = [{"image": np.asarray(Image.open(image_dir / "wide.png").convert("RGB")),
              "name": "wide"}]
  (batch,) = runner.segment(colour_model(), records, SETTINGS, num_classes=3, with_labels=False,
                        keep_predictions=True)
  np.testing.assert_array_equal(np.asarray(Image.open(out_dir / "wide_mask.png")),
                                palette[batch.images[0].prediction])


def test_predict_mlseg_writes_selected_classes(image_dir, tmp_path):
  written = predict.predict_images(
      colour_model(topk=1), image_dir / "wide.png", tmp_path / "out", SETTINGS,
      palette=PALETTE, class_names=NAMES, topk=1)
  (w,) = written
  classes = json.loads(open(w["classes"]).read())
  names = [c["name"] for c in classes["selected"]]
  # Windows over the left see mostly red, over the right mostly blue; green never wins.
  assert set(names) == {"red thing", "blue thing"} and classes["topk"] == 1
  scores = [c["score"] for c in classes["selected"]]
  assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
  mask = np.asarray(Image.open(w["mask"]))
  assert not (mask == np.asarray(PALETTE[1], np.uint8)).all(-1).any()


def test_predict_needs_topk_for_mlseg_and_rejects_bad_inputs(image_dir, tmp_path):
  kw = dict(class_names=NAMES)
  with pytest.raises(ValueError, match="topk"):
    predict.predict_images(colour_model(topk=1), image_dir / "small.png", tmp_path / "o",
                           SETTINGS, palette=PALETTE, **kw)
  with pytest.raises(ValueError, match="palette"):
    predict.predict_images(colour_model(), image_dir, tmp_path / "o", SETTINGS,
                           palette=PALETTE[:2], **kw)
  with pytest.raises(FileNotFoundError, match="missing"):
    predict.predict_images(colour_model(), tmp_path / "missing", tmp_path / "o", SETTINGS,
                           palette=PALETTE, **kw)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    predict.predict_images(colour_model(), tmp_path / "empty", tmp_path / "o", SETTINGS,
                           palette=PALETTE, **kw)


def test_an_image_that_does_not_read_is_reported_and_the_others_are_written(image_dir,
                                                                           tmp_path):
  good = (image_dir / "wide.png").read_bytes()
  (image_dir / "cut.png").write_bytes(good[: len(good) // 2])  # Truncated: header intact.
  (image_dir / "text.jpg").write_text("not an image at all")
  written = predict.predict_images(colour_model(), image_dir, tmp_path / "out", SETTINGS,
                                   palette=PALETTE, class_names=NAMES)
  failed = {w["image"].split("/")[-1]: w["error"] for w in written if "error" in w}
  assert set(failed) == {"cut.png", "text.jpg"}
  assert all("cannot read the image" in e for e in failed.values())
  pictures = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert pictures == sorted(f"{s}_{k}.png" for s in ("gray", "small", "wide")
                            for k in ("mask", "overlay", "overlay_legend"))


def _swatch_rows(panel, colour):
  """Rows of `panel` holding a run of at least 6 pixels of exactly `colour` (a swatch)."""
  exact = (panel == np.asarray(colour, np.uint8)).all(-1)
  runs = np.zeros(exact.shape[0], int)
  for y, row in enumerate(exact):
    best = run = 0
    for v in row:
      run = run + 1 if v else 0
      best = max(best, run)
    runs[y] = best
  return np.flatnonzero(runs >= 6)


def _swatches(panel, colour):
  """How many separate swatches of `colour` the panel holds (runs of swatch rows)."""
  rows = _swatch_rows(panel, colour)
  return 0 if not len(rows) else 1 + int((np.diff(rows) > 1).sum())


def test_the_overlay_legend_names_the_classes_present_in_their_colours(image_dir, tmp_path):
  written = predict.predict_images(
      colour_model(), image_dir / "wide.png", tmp_path / "out", SETTINGS,
      palette=PALETTE, class_names=NAMES)
  (w,) = written
  over = np.asarray(Image.open(w["overlay"]))
  pictured = np.asarray(Image.open(w["overlay_legend"]))
  h, wd = over.shape[:2]
  assert pictured.shape[1] > wd and pictured.shape[0] >= h and pictured.std() > 0
  np.testing.assert_array_equal(pictured[:h, :wd], over)  # The overlay itself, untouched.
  legend = pictured[:, wd:]
  assert legend.std() > 0
  # Red and blue are in the mask: one swatch each; green is not, so no swatch.
  assert _swatches(legend, PALETTE[0]) == 1 and _swatches(legend, PALETTE[2]) == 1
  assert _swatches(legend, PALETTE[1]) == 0


def test_the_mlseg_legend_also_lists_the_selected_classes(image_dir, tmp_path):
  (w,) = predict.predict_images(
      colour_model(topk=1), image_dir / "wide.png", tmp_path / "out", SETTINGS,
      palette=PALETTE, class_names=NAMES, topk=1)
  legend = np.asarray(Image.open(w["overlay_legend"]))[:, Image.open(w["overlay"]).width:]
  # Present in the mask and selected by the model: red and blue, twice each.
  assert _swatches(legend, PALETTE[0]) == 2 and _swatches(legend, PALETTE[2]) == 2
  assert _swatches(legend, PALETTE[1]) == 0


def test_the_comparison_picture_has_the_truth_the_prediction_and_both_legends():
  image = two_colour_image(40, 60)
  label = np.zeros((40, 60), np.int64)
  label[:, 30:] = 1  # Truth: red | green; prediction: red | blue.
  label[:5] = -1
  prediction = np.where(np.arange(60) < 30, 0, 2)[None].repeat(40, 0)
  picture = predict.comparison_picture(image, label, prediction, PALETTE, NAMES)
  gap = 2
  assert picture.shape[0] >= 40 and picture.shape[1] > 2 * 60 + gap
  assert (picture[40:, :120 + gap] == 255).all()  # A legend taller than the pictures.
  truth, predicted = picture[:40, :60], picture[:40, 60 + gap:120 + gap]
  np.testing.assert_array_equal(truth[:5], image[:5])  # Ignored pixels: the image alone.
  np.testing.assert_array_equal(predicted, predict.overlay(
      image, predict.colorize(prediction, np.asarray(PALETTE, np.uint8)), 0.5))
  legend = picture[:, 120 + gap:]
  assert _swatches(legend, PALETTE[0]) == 2  # In the truth and in the prediction.
  assert _swatches(legend, PALETTE[1]) == 1 and _swatches(legend, PALETTE[2]) == 1
