"""Evaluation as the reference does it (mmseg 0.17 `slide` test mode), jitted with static
shapes: `--mode eval`, `--mode predict`, training's periodic evaluation and `Segmenter.predict`.

What the reference computes for one image (REFERENCE.md §5; `encoder_decoder.py`,
`test_time_aug.py`):

  1. Keep-ratio resize to the test scale: factor = min(long / max(h, w), short / min(h, w)),
     new size int(h * factor + 0.5) x int(w * factor + 0.5) (mmcv `rescale_size`), by
     OpenCV's bilinear on the uint8 image. For multi-scale, the scale itself is first
     multiplied by each ratio and truncated: (int(2048 r), int(512 r)) for r in 0.5, 0.75,
     ..., 1.75, each also flipped horizontally (after the resize).
  2. Normalise, then slide a crop-sized window with the configured stride over the resized
     image: h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1 windows per column,
     window i spans y1 = i * stride, y2 = min(y1 + crop, h), y1 = max(y2 - crop, 0) (the last
     window is aligned to the border); the same along x. An image smaller than the crop is
     one window of its own size, which the ViT pads with zeros to a multiple of the patch.
  3. Each window's logits (1/16 of the window, on the model's padded token grid) are resized
     bilinearly (align_corners=False) straight to the window size, summed into a canvas and
     divided by the number of windows covering each pixel.
  4. The canvas is resized bilinearly to the original image size; softmax; a flipped pass is
     flipped back; multi-scale sums the probabilities of all passes; argmax.
  5. Scoring: a confusion matrix at the original resolution, ignore pixels excluded.

The modules, one concern each:

  geometry    scales, window grids, batch shapes, `EvalSettings`; the interpolation matrices
              that fold steps 3 and 4 into two einsums per window grid
  batching    `Batching` (images per batch, windows per call, built from `config.eval`
              here only) and the model call sizes it gives
  device      the jitted stages and how their arrays lie on the mesh's devices
  host        which images each process reads, reading ahead (the OpenCV resizes), and
              binning them into batches every process agrees on
  runner      the passes batch by batch: `segment` (per-image predictions), `evaluate`
              (metrics), `forward_calls` (the model calls, without running them)
  evaluators  what `config.eval.run` names (`ss`, `ms_flip`), the eval config's defaults,
              the jitted forward
  metrics     mIoU and the rest as mmseg computes them; the multi-label metrics of MLSeg
  pictures    the confusion heatmap and the per-class IoU bars of a result
  predict     masks, overlays and legends for any image files
  modes       from a config and a workdir to numbers and pictures: `--mode eval`,
              `--mode predict`, the periodic evaluation during training

MLSeg models: `logits_fn` may return `{"logits": ..., "image_logits": (N, n_cls)}`. Image-level
outputs for the multi-label metrics are taken over all windows of all passes of an image: the
score of a class is its largest image logit, the selected set the union of the windows' top-k.

The +GT oracle (`gt_classes=True`): `logits_fn(windows, classes)` also takes, per window, the
class set of its whole image's label as the reference hands it over: the label resized
(nearest) to that pass's scale with the image, so each scale has its own set.
"""
