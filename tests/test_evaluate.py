"""Sliding-window / multi-scale evaluation against a plain NumPy loop over windows (mmseg's
`slide_inference` + `aug_test`, written out), confusion matrices against NumPy."""

import sys
import threading
from pathlib import Path

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax.evaluation import batching
from mlseg_jax.evaluation import device
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import host
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax.evaluation import runner
from mlseg_jax.resize import linear_matrix

PATCH = 8
C = 5
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------- random models


def pooled_linear_model(seed=0, num_classes=C, topk=None):
  """Random 'model': pads to the patch grid, pools patches, a linear map per token plus a
  global term (so padding the window changes every logit, as attention does). With `topk`,
  MLSeg-style: image logits, and -100 outside each window's top-k classes."""
  rng = np.random.default_rng(seed)
  w_local = jnp.asarray(rng.normal(size=(3, num_classes)), jnp.float32)
  w_global = jnp.asarray(rng.normal(size=(3, num_classes)), jnp.float32)
  w_image = jnp.asarray(rng.normal(size=(3, num_classes)), jnp.float32)

  @jax.jit
  def logits_fn(x):
    n, h, w, _ = x.shape
    gh, gw = -(-h // PATCH), -(-w // PATCH)
    x = jnp.pad(x, ((0, 0), (0, gh * PATCH - h), (0, gw * PATCH - w), (0, 0)))
    t = x.reshape(n, gh, PATCH, gw, PATCH, 3).mean((2, 4))
    pooled = t.mean((1, 2))
    logits = t @ w_local + (pooled @ w_global)[:, None, None]
    if topk is None:
      return logits
    image_logits = pooled @ w_image * 3.0
    top = jax.lax.top_k(image_logits, topk)[1]
    keep = jax.nn.one_hot(top, num_classes).sum(1) > 0
    return {"logits": jnp.where(keep[:, None, None], logits, -100.0),
            "image_logits": image_logits}

  return logits_fn


class TinyConvNet(nn.Module):
  """A patch-embedding conv and a 1x1 classifier: the smallest real Flax segmenter."""

  @nn.compact
  def __call__(self, x):
    n, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % PATCH), (0, -w % PATCH), (0, 0)))
    x = nn.relu(nn.Conv(16, (PATCH, PATCH), strides=PATCH)(x))
    x = x + x.mean((1, 2), keepdims=True)
    return nn.Conv(C, (1, 1))(x)


# ----------------------------------------------------------------------------- NumPy reference


def np_resize(x, out_h, out_w):
  """PyTorch bilinear (align_corners=False) of (H, W, C) in float64, resize.py's matrices."""
  x = np.asarray(x, np.float64)
  mh = linear_matrix(x.shape[0], out_h).astype(np.float64)
  mw = linear_matrix(x.shape[1], out_w).astype(np.float64)
  x = np.tensordot(mh, x, axes=(1, 0))  # (out_h, W, C)
  return np.moveaxis(np.tensordot(mw, x, axes=(1, 1)), 0, 1)  # (out_h, out_w, C)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_scores(model, image, s: geometry.EvalSettings, topk=None):
  """What mmseg computes before the argmax, window by window; also MLSeg image outputs."""
  h, w = image.shape[:2]
  (ch, cw), (sh, sw) = s.crop, s.stride
  total, best, chosen = 0.0, None, None
  passes = s.passes
  for scale, flip in passes:
    hs, ws = geometry.rescale_size(h, w, scale)
    img = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    if flip:
      img = img[:, ::-1]
    img = (img - np.asarray(s.mean)) / np.asarray(s.std)
    canvas, count = 0.0, np.zeros((hs, ws, 1))
    for i in range(max(hs - ch + sh - 1, 0) // sh + 1):
      for j in range(max(ws - cw + sw - 1, 0) // sw + 1):
        y1, x1 = i * sh, j * sw
        y2, x2 = min(y1 + ch, hs), min(x1 + cw, ws)
        y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
        win = img[y1:y2, x1:x2]
        th, tw = win.shape[:2]
        if s.small_window_multiple == 0:  # ours, opt-in: the window zero-padded to the crop
          win = np.pad(win, ((0, ch - th), (0, cw - tw), (0, 0)))
        # (else mmseg itself: the window as it is; the model pads it to the patch grid.)
        out = model(jnp.asarray(win[None], jnp.float32))
        logits = out["logits"] if isinstance(out, dict) else out
        p = s.patch_size
        grid = np.asarray(logits[0], np.float64)[:-(-th // p), :-(-tw // p)]
        full = np.zeros((hs, ws, grid.shape[-1]))
        full[y1:y2, x1:x2] = np_resize(grid, th, tw)
        canvas = canvas + full
        count[y1:y2, x1:x2] += 1
        if isinstance(out, dict):
          il = np.asarray(out["image_logits"][0])
          best = il if best is None else np.maximum(best, il)
          top = np.zeros(il.shape, bool)
          top[np.argsort(-il)[:topk]] = True
          chosen = top if chosen is None else chosen | top
    assert (count > 0).all()
    out = np_resize(canvas / count, h, w)
    if len(passes) > 1:
      out = np_softmax(out)
    if flip:
      out = out[:, ::-1]
    total = total + out
  return total, best, chosen


def settings(**kw):
  base = dict(mean=MEAN, std=STD, test_scale=(64, 32), crop=(32, 32), stride=(32, 32),
              patch_size=PATCH)
  base.update(kw)
  return geometry.EvalSettings(**base)


def run(model, records, s, *, labels=True, **kw):
  kw.setdefault("num_classes", C)
  out = []
  for batch in runner.segment(model, records, s, with_labels=labels, keep_predictions=True,
                          keep_scores=True, **kw):
    out.extend(batch.images)
  return sorted(out, key=lambda r: r.index)


def make_records(sizes, seed=0, ignore_fraction=0.2, num_classes=C):
  rng = np.random.default_rng(seed)
  records = []
  for i, (h, w) in enumerate(sizes):
    label = rng.integers(0, num_classes, (h, w)).astype(np.int32)
    label[rng.random((h, w)) < ignore_fraction] = IGNORE_LABEL
    records.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    "label": label, "name": f"img{i}"})
  return records


# ----------------------------------------------------------------------------- tests


# (image h, w), crop, stride. The test scale is the image's own size (rescale factor 1), so
# only the windowing is under test here; resizing is covered by the multi-scale test.
WINDOW_CASES = [
    ((20, 27), (32, 32), (32, 32)),  # smaller than the window
    ((32, 32), (32, 32), (32, 32)),  # equal
    ((32, 90), (32, 32), (20, 20)),  # wider, stride < window
    ((75, 50), (32, 40), (24, 16)),  # larger both ways, overlapping, non-square
    ((21, 75), (32, 32), (24, 24)),  # shorter than the window, longer than it the other way
]


@pytest.mark.parametrize("size,crop,stride", WINDOW_CASES)
def test_sliding_window_logits_match_numpy_loop(size, crop, stride):
  model = pooled_linear_model(seed=1)
  records = make_records([size], seed=2)
  s = settings(test_scale=(max(size), min(size)), crop=crop, stride=stride)
  (got,) = run(model, records, s)
  want, _, _ = reference_scores(model, records[0]["image"], s)
  np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.prediction, want.argmax(-1))


def test_small_windows_are_mmseg_exact_by_default_and_padded_on_request():
  """By default (small_window_multiple = the patch) a window on a small image is what mmseg
  feeds its model (the image itself, padded by the model to the patch grid);
  small_window_multiple=0 pads it to the crop instead, and the scores differ."""
  model = pooled_linear_model(seed=3)
  size = (21, 75)
  records = make_records([size], seed=4)
  exact = settings(test_scale=(75, 21), crop=(32, 32), stride=(24, 24))
  assert exact.small_window_multiple == PATCH
  (got,) = run(model, records, exact)
  want, _, _ = reference_scores(model, records[0]["image"], exact)
  np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-4)
  padded = settings(test_scale=(75, 21), crop=(32, 32), stride=(24, 24),
                    small_window_multiple=0)
  (got_padded,) = run(model, records, padded)
  padded_want, _, _ = reference_scores(model, records[0]["image"], padded)
  np.testing.assert_allclose(got_padded.scores, padded_want, rtol=1e-4, atol=1e-4)
  assert np.abs(padded_want - want).max() > 1e-2  # The two settings do differ.


def test_multiscale_flip_matches_numpy_reference_on_flax_model():
  net = TinyConvNet()
  params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  model = jax.jit(lambda x: net.apply(params, x))
  records = make_records([(36, 52)], seed=5)
  s = settings(test_scale=(64, 32), crop=(32, 32), stride=(24, 24),
               ratios=(0.5, 1.0, 1.75), flip=True)
  (got,) = run(model, records, s)
  want, _, _ = reference_scores(model, records[0]["image"], s)
  # Probabilities summed over 6 passes; the images are OpenCV's on both sides, so only the
  # float32 summation order differs.
  np.testing.assert_allclose(got.scores, want, atol=1e-4)
  np.testing.assert_array_equal(got.prediction, want.argmax(-1))
  assert np.allclose(got.scores.sum(-1), len(s.passes), atol=1e-4)


def window_recorder(num_classes=C):
  """A 'model' that keeps every window it is given, in call order, and returns zeros."""
  seen = []

  def logits_fn(windows):
    seen.append(np.asarray(windows))
    n, h, w, _ = windows.shape
    return np.zeros((n, -(-h // PATCH), -(-w // PATCH), num_classes), np.float32)

  return logits_fn, seen


# Down and up, both axes and one, odd factors, exact halving (OpenCV's INTER_AREA case).
RESIZE_CASES = [(20, 27), (64, 64), (37, 53), (61, 30), (17, 90), (100, 133), (9, 11)]


@pytest.mark.parametrize("size", RESIZE_CASES)
def test_model_sees_opencv_resized_windows_bit_for_bit(size):
  """The windows reaching the model are mmcv's: cv2.resize(INTER_LINEAR) of the uint8
  image to each test scale, flipped after the resize, cut at mmseg's window positions;
  pixels beyond the image are 0 (identity normalisation here)."""
  s = settings(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), test_scale=(64, 32), crop=(32, 32),
               stride=(24, 24), ratios=(0.5, 0.75, 1.0, 1.3, 1.75), flip=True)
  (record,) = make_records([size], seed=sum(size))
  logits_fn, seen = window_recorder()
  run(logits_fn, [record], s, batching=batching.Batching(images_per_batch=1, windows_per_call=1))
  want = []
  for scale, flip in s.passes:
    hs, ws = geometry.rescale_size(*size, scale)
    img = cv2.resize(record["image"], (ws, hs), interpolation=cv2.INTER_LINEAR)
    img = img[:, ::-1] if flip else img
    for i in range(geometry.num_windows(hs, 32, 24)):
      for j in range(geometry.num_windows(ws, 32, 24)):
        y2, x2 = min(i * 24 + 32, hs), min(j * 24 + 32, ws)
        want.append(img[max(y2 - 32, 0):y2, max(x2 - 32, 0):x2])
  assert len(seen) == len(want)
  for got, win in zip(seen, want):
    th, tw = win.shape[:2]
    assert got.shape[1:3] == (-(-th // PATCH) * PATCH, -(-tw // PATCH) * PATCH)
    np.testing.assert_array_equal(got[0, :th, :tw], win)
    assert not got[0, th:].any() and not got[0, :, tw:].any()


def test_batched_sharded_run_matches_per_image_reference_and_confusion():
  """Several images of different shapes, batched two per call over 8 devices (a 1-D mesh,
  then a 2x4 mesh sharded over both axes); predictions and the confusion matrix equal the
  per-image reference."""
  model = pooled_linear_model(seed=7)
  sizes = [(40, 40), (40, 56), (56, 40), (40, 48), (40, 56), (48, 40), (40, 56)]
  records = make_records(sizes, seed=8)
  s = settings(test_scale=(56, 40), crop=(48, 48), stride=(32, 32))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  got = run(model, records, s, mesh=mesh, batching=batching.Batching(images_per_batch=2))
  assert [r.index for r in got] == list(range(len(sizes)))
  confusion = np.zeros((C, C), np.int64)
  for r, rec in zip(got, records):
    want, _, _ = reference_scores(model, rec["image"], s)
    np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(r.prediction, want.argmax(-1))
    valid = rec["label"] != IGNORE_LABEL
    np.add.at(confusion, (rec["label"][valid], r.prediction[valid]), 1)
  mesh_2d = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  results = runner.evaluate(model, records, s, num_classes=C, mesh=mesh_2d,
                            data_axis=("data", "fsdp"), batching=batching.Batching(images_per_batch=2))
  want = metrics_lib.segmentation_metrics(confusion)
  assert results["labelled_pixels"] == sum((r["label"] >= 0).sum() for r in records)
  for k in ("aAcc", "mIoU", "mAcc"):
    assert results[k] == pytest.approx(want[k], abs=1e-12)


def counting(model):
  """`model`, recording the number of windows of each call."""
  calls = []

  def logits_fn(x):
    calls.append(x.shape[0])
    return model(x)

  return logits_fn, calls


def windows_needed(records, s):
  return sum(p.rows * p.cols for r in records
             for p in s.batch_shape(*r["image"].shape[:2]).passes)


def test_a_call_takes_each_devices_windows_from_its_own_share():
  """Windows are dealt out over the devices (window i on device i % 8), so a call's slice is
  local: no collective in the take and put programs (a contiguous layout all-gathered the
  whole part on every call, and XLA:CPU's rendezvous could stall on it)."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  layout = (1, 13, 16, 8)  # 1 host, 13 windows padded to 16, 8 devices.
  x = jnp.arange(13 * 2, dtype=jnp.float32).reshape(13, 2)
  blocks = jax.jit(lambda x: device._constrain(device.to_blocks(x, *layout), sharding))(x)
  np.testing.assert_array_equal(device.from_blocks(blocks, *layout), x)
  # Device d's share holds windows d and d + 8.
  assert [np.asarray(s.data)[:, 0].tolist() for s in blocks.addressable_shards][:2] == [
      [0, 16], [2, 18]]
  offset = np.int32(1)  # The second window of every device's share: windows 8 .. 15.
  chunk = device.take_chunk(blocks, offset, shards=8, size=1, sharding=sharding)
  np.testing.assert_array_equal(np.asarray(chunk)[:5, 0], x[8:, 0])
  buffer = device.put_chunk(jnp.zeros_like(blocks), chunk * 0 + 1, offset, shards=8,
                         sharding=sharding)
  np.testing.assert_array_equal(np.asarray(device.from_blocks(buffer, *layout))[:, 0],
                                [0] * 8 + [1] * 5)
  for hlo in (device.take_chunk.lower(blocks, offset, shards=8, size=1, sharding=sharding),
              device.put_chunk.lower(jnp.zeros_like(blocks), chunk, offset, shards=8,
                                  sharding=sharding)):
    text = hlo.compile().as_text()
    assert not any(op in text for op in ("all-gather", "all-to-all", "all-reduce",
                                         "collective-permute")), text


def test_call_sizes_cover_what_is_left_in_few_static_sizes():
  for largest, unit in [(8, 1), (8, 2), (6, 1), (32, 8), (8, 8)]:
    allowed = {largest} | {unit * 2 ** j for j in range(8) if unit * 2 ** j < largest}
    for n in range(1, 70):
      sizes = batching.call_sizes(n, largest, unit)
      assert sum(sizes) == -(-n // unit) * unit  # Nothing past the last device's share.
      assert set(sizes) <= allowed and sizes == sorted(sizes, reverse=True)
  assert batching.call_sizes(6, 8) == [4, 2] and batching.call_sizes(13, 8) == [8, 4, 1]
  # smallest = largest: one size, the last call padded (one compilation per window shape).
  assert batching.call_sizes(13, 8, 8) == [8, 8] and batching.call_sizes(3, 6, 6) == [6]
  assert batching.call_sizes(5, 6, 4) == [6] and batching.call_sizes(13, 8, 2) == [8, 4, 2]
  assert [batching.image_slots(n, 4) for n in range(1, 6)] == [1, 2, 4, 4, 4]
  assert [batching.image_slots(n, 8, 2) for n in (1, 2, 3, 5)] == [2, 2, 4, 8]


def test_calls_compute_only_the_windows_the_images_have():
  """Images of three shapes, each alone in its bin, at several scales: the model sees
  exactly the windows the images have (nothing padded to windows_per_call or to
  images_per_batch), in at most 1 + log2(8) call sizes, and the numbers stay the
  reference's."""
  model = pooled_linear_model(seed=12)
  records = make_records([(40, 88), (88, 40), (72, 72)], seed=13)
  s = settings(test_scale=(96, 48), crop=(32, 32), stride=(24, 24), ratios=(0.5, 1.0, 1.5),
               flip=True)
  logits_fn, calls = counting(model)
  got = run(logits_fn, records, s, batching=batching.Batching(images_per_batch=2))
  assert sum(calls) == windows_needed(records, s)
  assert len(set(calls)) <= 4
  for r, rec in zip(got, records):
    want, _, _ = reference_scores(model, rec["image"], s)
    np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-4)
  # On 8 devices a call holds a multiple of 8 windows: at most 7 computed per call beyond
  # those needed, and the numbers do not change.
  logits_fn, calls = counting(model)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = run(logits_fn, records, s, mesh=mesh,
                batching=batching.Batching(images_per_batch=2, windows_per_call=32))
  assert all(n % 8 == 0 and n <= 32 for n in calls)
  assert set(calls) <= {8, 16, 32}
  assert sum(calls) < windows_needed(records, s) + 8 * len(calls)
  for a, b in zip(got, sharded):
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
  # min_windows_per_call = windows_per_call: every call full size, the same numbers.
  logits_fn, calls = counting(model)
  padded = run(logits_fn, records, s, batching=batching.Batching(
      images_per_batch=2, windows_per_call=8, min_windows_per_call=8))
  assert set(calls) == {8} and sum(calls) > windows_needed(records, s)
  for a, b in zip(got, padded):
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_mlseg_fill_survives_and_image_outputs_match_reference():
  k = 2
  model = pooled_linear_model(seed=9, topk=k)
  records = make_records([(30, 70)], seed=10)
  s = settings(test_scale=(70, 30), crop=(32, 32), stride=(24, 24))
  (got,) = run(model, records, s, topk=k)
  want, best, chosen = reference_scores(model, records[0]["image"], s, topk=k)
  np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.image_scores, best, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.selected, chosen)
  never = ~chosen
  assert never.any()  # Some class is selected by no window: its logits stay -100.
  np.testing.assert_allclose(got.scores[..., never], -100.0, atol=1e-3)
  assert np.isin(got.prediction, np.flatnonzero(chosen)).all()
  results = runner.evaluate(model, records, s, num_classes=C, topk=k)
  hist = np.bincount(records[0]["label"][records[0]["label"] >= 0], minlength=C)
  assert results["multilabel"]["mAP"] == pytest.approx(
      metrics_lib.average_precision(best, hist > 0))
  assert results["multilabel"]["recall"] == pytest.approx(
      (chosen & (hist > 0)).sum() / (hist > 0).sum())


def test_model_output_with_wrong_grid_is_a_clear_error():
  bad = jax.jit(lambda x: jnp.zeros((x.shape[0], 3, 3, C)))
  with pytest.raises(ValueError, match="token grid"):
    run(bad, make_records([(32, 32)]), settings())


def test_mesh_without_the_data_axis_is_a_clear_error():
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  with pytest.raises(ValueError, match="no data axis"):
    run(pooled_linear_model(), make_records([(32, 32)]), settings(), mesh=mesh)


def test_bad_label_values_name_the_image():
  records = make_records([(32, 32)])
  records[0]["label"][0, 0] = C
  with pytest.raises(ValueError, match="img0"):
    run(pooled_linear_model(), records, settings())


def test_host_split_covers_every_image_once():
  for n, hosts in [(7, 2), (8, 4), (3, 4), (1, 1)]:
    parts = [host.host_indices(n, p, hosts) for p in range(hosts)]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for i in p if i is not None]
    assert sorted(flat) == list(range(n))


def test_batch_stream_runs_the_same_shapes_on_two_simulated_hosts():
  """Two processes (threads) bin their own images; an allgather by barrier makes them agree:
  both yield the same sequence of shapes and every image comes out exactly once."""
  s = settings(test_scale=(64, 32), crop=(32, 32), stride=(32, 32))
  rng = np.random.default_rng(11)
  sizes = [tuple(int(v) for v in rng.choice([20, 40, 64, 90], 2)) for _ in range(23)]
  records = [{"image": np.zeros((h, w, 3), np.uint8), "name": str(i)}
             for i, (h, w) in enumerate(sizes)]
  hosts, slots, barrier = 2, [None, None], threading.Barrier(2)

  def allgather_for(p):
    def allgather(x):
      slots[p] = np.asarray(x)
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()
      return out
    return allgather

  shape_of = lambda rec: s.batch_shape(*rec["image"].shape[:2])
  code_len = 2 + 6 * len(s.passes)
  outputs = [None, None]

  def one_host(p):
    items = host.read_ahead(records, host.host_indices(len(records), p, hosts), threads=2, depth=3)
    outputs[p] = list(host.batch_stream(items, shape_of, 3, code_len, allgather_for(p)))

  threads = [threading.Thread(target=one_host, args=(p,)) for p in range(hosts)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  a, b = outputs
  assert [x.shape for x in a] == [x.shape for x in b]
  assert all(x.max_items == y.max_items == max(len(x.items), len(y.items)) for x, y in zip(a, b))
  seen = [i for out in outputs for batch in out for i, _ in batch.items]
  assert sorted(seen) == list(range(len(records)))
  for out in outputs:
    for batch in out:
      assert 0 < batch.max_items <= 3
      for i, rec in batch.items:
        assert shape_of(rec) == batch.shape


def test_bucket_length_bounds_padding():
  for n in range(1, 5000, 7):
    b = geometry.bucket_length(n)
    assert b >= n and (n <= 64 or b <= n * 1.125 + 1)


CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def camvid_val_records(n):
  from PIL import Image

  images = sorted((CAMVID / "images" / "val").glob("*.jpg"))[:n]
  if not images:
    pytest.skip(f"no CamVid images under {CAMVID}")
  records = []
  for path in images:
    label = np.asarray(Image.open(CAMVID / "labels" / "val" / f"{path.stem}.png"), np.int32)
    records.append({"image": np.asarray(Image.open(path).convert("RGB")),
                    "label": np.where(label == 255, IGNORE_LABEL, label), "name": path.stem})
  return records


class Patch16Net(nn.Module):
  """Patch-16 conv + 3x3 conv + classifier, 11 classes: real window and grid sizes."""

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)))
    x = nn.Conv(16, (16, 16), strides=16)(x)
    x = x + nn.Conv(16, (3, 3))(nn.relu(x))
    return nn.Dense(11)(x)


@pytest.mark.slow
def test_camvid_val_at_real_shapes_matches_reference():
  """CamVid 360x480 images at test scale (2048, 512): 512x683, two 512 windows each, through
  `evaluate` on 8 devices."""
  records = camvid_val_records(3)
  net = Patch16Net()
  params = jax.jit(net.init)(jax.random.key(1), jnp.zeros((1, 64, 64, 3)))
  model = jax.jit(lambda x: net.apply(params, x))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  shapes = dict(test_scale=(2048, 512), crop=(512, 512), stride=(512, 512), patch_size=16)
  results = runner.evaluate(model, records, settings(**shapes), num_classes=11, mesh=mesh,
                            batching=batching.Batching(images_per_batch=2))
  confusion = np.zeros((11, 11), np.int64)
  for rec in records:
    want, _, _ = reference_scores(model, rec["image"], settings(**shapes))
    valid = rec["label"] >= 0
    np.add.at(confusion, (rec["label"][valid], want.argmax(-1)[valid]), 1)
  want = metrics_lib.segmentation_metrics(confusion)
  assert results["labelled_pixels"] == want["labelled_pixels"]
  assert results["aAcc"] == pytest.approx(want["aAcc"], abs=1e-4)
  assert results["mIoU"] == pytest.approx(want["mIoU"], abs=1e-3)


def load_throughput_benchmark():
  import importlib.util

  path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_throughput.py"
  spec = importlib.util.spec_from_file_location("eval_throughput", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # Flax modules are dataclasses: they look their module up.
  spec.loader.exec_module(bench)
  return bench


def table_rows(out):
  lines = [line.split(" | ") for line in out.splitlines() if " | " in line]
  header, rows = lines[0], lines[1:]
  return {row[0]: dict(zip(header, row)) for row in rows}


def test_throughput_benchmark_prints_its_table(capsys):
  bench = load_throughput_benchmark()
  results = bench.main(["--tiny", "--images", "3", "--sizes", "40x50,50x90", "--crop", "32",
                        "--test-scale", "64,32", "--num-classes", "3",
                        "--images-per-batch", "2"])
  rows = table_rows(capsys.readouterr().out)
  assert set(rows) == {"single scale", "multi-scale + flip"}
  for mode, r in results.items():
    row = rows[bench.MODES[mode]]
    assert r["images_per_s"] > 0
    assert float(row["images/s"]) == pytest.approx(r["images_per_s"], rel=0.01, abs=0.01)
    # 8 devices: a call is a multiple of 8 windows, so at most 7 per call are padding.
    assert r["windows_needed"] <= r["windows_computed"] < r["windows_needed"] + 8 * r["calls"]
    assert row["windows computed / needed"] == f"{r['windows_computed']} / {r['windows_needed']}"
    assert r["compiles_first"] > 0 and r["compiles_timed"] == 0  # Nothing compiles twice.
  # Single scale, 3 images of 1 + 2 windows at the test scale.
  assert results["ss"]["windows_needed"] == 2 + 2 + 2


def test_throughput_benchmark_runs_a_config_on_its_dataset(capsys):
  """The config's evaluators on the bundled CamVid images, over the config's mesh (the 8
  test devices)."""
  bench = load_throughput_benchmark()
  results = bench.main(["--config", str(Path(__file__).resolve().parents[1] / "configs" /
                                        "quickstart.py"),
                        "--data-root", str(QUICKSTART_DATA), "--images", "2", "--modes", "ss"])
  out = capsys.readouterr().out
  assert "2 val images of" in out and "quickstart.py" in out
  r = results["ss"]
  assert r["images"] == 2 and 0 < r["windows_needed"] <= r["windows_computed"]
  assert r["windows_computed"] < r["windows_needed"] + 8 * r["calls"]
  assert r["compiles_timed"] == 0
