"""Grain pipelines: determinism, exact resume through Orbax, per-host slices, evaluation."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

from mlseg_jax import data

NUM_IMAGES = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A folder dataset whose image i has every label pixel = i: a batch says which records
  it holds."""
  root = tmp_path_factory.mktemp("folder")
  (root / "images").mkdir()
  (root / "labels").mkdir()
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    h, w = (24, 32) if i % 3 else (30, 20)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        root / "images" / f"im{i}.png")
    PIL.Image.fromarray(np.full((h, w), i, np.uint8)).save(root / "labels" / f"im{i}.png")
  return root


def _config(root, **kw):
  c = data.default_config()
  c.name, c.root = "folder", str(root)
  c.num_classes, c.mean, c.std = NUM_IMAGES, (127.5,) * 3, (127.5,) * 3
  c.crop_size, c.img_scale, c.test_scale = (16, 16), (48, 20), (40, 16)
  c.cat_max_ratio = 1.0  # Every label map is one class: the retry rule would only spin.
  for k, v in kw.items():
    c[k] = v
  return c


def _ids(batch):
  """Record ids of a batch: each crop's label is its record's id (or padding)."""
  return [int(lab.max()) for lab in batch["label"]]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_have_the_promised_shapes_and_are_deterministic(folder):
  it = data.make_train_iterator(_config(folder), 4, seed=1, process_index=0, process_count=1)
  first = _take(it, 3)
  assert first[0]["image"].shape == (4, 16, 16, 3) and first[0]["image"].dtype == np.float32
  assert first[0]["label"].shape == (4, 16, 16) and first[0]["label"].dtype == np.int32
  assert sorted(_ids(first[0]) + _ids(first[1])) == list(range(NUM_IMAGES))  # One epoch.
  again = _take(data.make_train_iterator(_config(folder), 4, seed=1, process_index=0,
                                         process_count=1), 3)
  _assert_same(first, again)
  other = _take(data.make_train_iterator(_config(folder), 4, seed=2, process_index=0,
                                         process_count=1), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
  # Same data order (shuffle_seed), different augmentation (seed).
  assert [_ids(b) for b in first] == [_ids(b) for b in other]


def test_two_processes_read_disjoint_slices_that_cover_the_split(folder):
  per_host = []
  for index in range(2):
    it = data.make_train_iterator(_config(folder), 4, seed=0, process_index=index,
                                  process_count=2)
    batches = _take(it, 2)  # 2 hosts x 2 steps x 2 images = one epoch.
    assert batches[0]["image"].shape[0] == 2
    per_host.append([i for b in batches for i in _ids(b)])
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == list(range(NUM_IMAGES))
  # The global batch is the same records as with one process: order does not depend on P.
  single = _take(data.make_train_iterator(_config(folder), 4, seed=0, process_index=0,
                                          process_count=1), 2)
  for step in range(2):
    assert sorted(_ids(single[step])) == sorted(per_host[0][2 * step:2 * step + 2] +
                                                per_host[1][2 * step:2 * step + 2])
  with pytest.raises(ValueError, match="does not split"):
    data.make_train_iterator(_config(folder), 5, seed=0, process_index=0, process_count=2)


def test_restored_iterator_continues_exactly(folder, tmp_path):
  config = _config(folder)
  it = data.make_train_iterator(config, 2, seed=3, process_index=0, process_count=1)
  _take(it, 5)  # Past the first epoch.
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=data.checkpoint_args(it)))
    mngr.wait_until_finished()
    expected = _take(it, 4)
    fresh = data.make_train_iterator(config, 2, seed=3, process_index=0, process_count=1)
    mngr.restore(5, args=ocp.args.Composite(data=data.checkpoint_args(fresh, restore=True)))
  _assert_same(_take(fresh, 4), expected)
  # get_state / set_state without Orbax too.
  again = data.make_train_iterator(config, 2, seed=3, process_index=0, process_count=1)
  again.set_state(it.get_state())
  _assert_same(_take(again, 2), _take(it, 2))


def test_worker_processes_give_the_same_batches(folder):
  inline = _take(data.make_train_iterator(_config(folder), 2, seed=4, process_index=0,
                                          process_count=1), 4)
  it = data.make_train_iterator(_config(folder, num_workers=2), 2, seed=4, process_index=0,
                                process_count=1)
  try:
    _assert_same(_take(it, 4), inline)
  finally:
    it.close()


def test_global_batch_from_process_local_data(folder):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(data.make_train_iterator(_config(folder), 2 * jax.device_count(), seed=0))
  arrays = data.make_global_batch(batch, sharding)
  assert arrays["image"].shape == (2 * jax.device_count(), 16, 16, 3)
  assert arrays["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])


# ---------------------------------------------------------------------------------------
# Device prefetch.


class _Counting:
  """A checkpointable iterator of ints that counts how far it has been read."""

  def __init__(self, fail_at=None, end_at=None):
    self.position, self.fail_at, self.end_at = 0, fail_at, end_at

  def __iter__(self):
    return self

  def __next__(self):
    if self.position == self.end_at:
      raise StopIteration
    if self.position == self.fail_at:
      raise ValueError(f"record {self.position} is corrupt")
    self.position += 1
    return self.position - 1

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def test_prefetch_reads_ahead_but_checkpoints_what_was_returned():
  import json
  import time

  from mlseg_jax.data.pipeline import DevicePrefetch

  inner = _Counting()
  it = DevicePrefetch(inner, to_device=lambda x: x * 10, size=3)
  assert [next(it) for _ in range(2)] == [0, 10]
  deadline = time.time() + 30
  while inner.position < 2 + 3 and time.time() < deadline:  # Two returned, three queued.
    time.sleep(0.01)
  time.sleep(0.2)
  assert inner.position in (5, 6)  # 3 queued, perhaps 1 more waiting for room: no further.
  assert json.loads(it.get_state()) == {"position": 2}
  it.set_state(json.dumps({"position": 7}).encode())  # Drops what was read ahead.
  assert [next(it) for _ in range(2)] == [70, 80]
  assert json.loads(it.get_state()) == {"position": 9}
  it.close()


def test_prefetch_raises_a_reading_error_at_the_batch_it_belongs_to():
  from mlseg_jax.data.pipeline import DevicePrefetch

  it = DevicePrefetch(_Counting(fail_at=3), size=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  for _ in range(2):
    with pytest.raises(ValueError, match="record 3 is corrupt"):
      next(it)
  assert list(DevicePrefetch(_Counting(end_at=4))) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="at least 1"):
    DevicePrefetch(_Counting(), size=0)
  with pytest.raises(TypeError, match="cannot be checkpointed"):
    DevicePrefetch(iter([1, 2])).get_state()


def test_prefetched_grain_iterator_resumes_exactly_through_orbax(folder, tmp_path):
  from mlseg_jax.data.pipeline import DevicePrefetch

  config = _config(folder)
  make = lambda: data.make_train_iterator(config, 2, seed=3, process_index=0, process_count=1)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  to_device = lambda b: data.make_global_batch(b, sharding)
  plain = make()
  expected = _take(plain, 9)
  it = DevicePrefetch(make(), to_device, size=2)
  got = _take(it, 5)
  _assert_same(jax.device_get(got), expected[:5])
  assert isinstance(got[0]["image"], jax.Array)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=data.checkpoint_args(it)))
    mngr.wait_until_finished()
    _assert_same(jax.device_get(_take(it, 4)), expected[5:])
    # The file is the Grain iterator's own: with or without prefetch on either side.
    for fresh in (DevicePrefetch(make(), to_device, size=2), make()):
      mngr.restore(5, args=ocp.args.Composite(data=data.checkpoint_args(fresh,
                                                                        restore=True)))
      _assert_same(jax.device_get(_take(fresh, 4)), expected[5:])
      if isinstance(fresh, DevicePrefetch):
        fresh.close()
  it.close()


# ---------------------------------------------------------------------------------------
# data.on_error = "skip".

BAD = (2, 5)  # Records of `spoiled` that do not read.


@pytest.fixture(scope="module")
def spoiled(folder, tmp_path_factory):
  """`folder` with a truncated image (record 2) and a label value out of range (record 5)."""
  import shutil

  root = tmp_path_factory.mktemp("spoiled")
  shutil.copytree(folder, root, dirs_exist_ok=True)
  image = root / "images" / "im2.png"
  image.write_bytes(image.read_bytes()[:200])
  PIL.Image.fromarray(np.full((24, 32), 200, np.uint8)).save(root / "labels" / "im5.png")
  return root


def _next_good(order, position):
  """The record that position `position` of `order` holds when BAD records are skipped."""
  while order[position] in BAD:
    position += 1
  return order[position]


def test_skip_fills_a_bad_record_s_place_with_the_next_good_one(spoiled, tmp_path):
  import shutil

  import grain

  # An image without its label map is left out too, rather than refused.
  shutil.copytree(spoiled, tmp_path, dirs_exist_ok=True)
  PIL.Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "images" / "im9.png")
  with pytest.raises(ValueError, match=r"im9\.png: no label map .*labels/im9\{\.png,"):
    data.make_train_iterator(_config(tmp_path), 2, seed=3, process_index=0, process_count=1)
  it = data.make_train_iterator(_config(tmp_path, on_error="skip"), 2, seed=3,
                                process_index=0, process_count=1)
  batches = _take(it, 12)  # Three epochs.
  order = grain.MapDataset.range(NUM_IMAGES).shuffle(seed=0).repeat()
  assert [i for b in batches for i in _ids(b)] == [_next_good(order, p) for p in range(24)]
  assert it.skipped_records == sum(order[p] in BAD for p in range(24)) > 0
  assert sorted(batches[0]) == ["image", "label"]


def test_skip_resumes_exactly_and_worker_processes_agree(spoiled):
  make = lambda **kw: data.make_train_iterator(_config(spoiled, on_error="skip", **kw), 2,
                                               seed=3, process_index=0, process_count=1)
  it = make()
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = make()
  resumed.set_state(state)
  _assert_same(_take(resumed, 6), expected)
  workers = make(num_workers=2)  # Each process keeps its own list of the bad records.
  try:
    _assert_same(_take(workers, 11)[5:], expected)
  finally:
    workers.close()


def test_raise_stops_at_the_first_bad_record_naming_it(spoiled):
  it = data.make_train_iterator(_config(spoiled), 2, seed=3, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"im[25]\.png: (cannot read the image|label values "
                                       r"\[200\] are out of range)"):
    _take(it, NUM_IMAGES)
  with pytest.raises(ValueError, match=r"data.on_error='drop' must be one of 'raise', 'skip'"):
    data.make_train_iterator(_config(spoiled, on_error="drop"), 2, seed=3)


def test_training_skips_bad_records_and_resumes_with_the_same_batches(tmp_path):
  from test_data_check import copy_camvid
  from test_train import tiny_train_config

  from mlseg_jax import train

  root = tmp_path / "camvid"
  stems = copy_camvid(root, 10)
  truncated = root / "images" / "train" / f"{stems[3]}.jpg"
  truncated.write_bytes(truncated.read_bytes()[:5000])
  label = root / "labels" / "train" / f"{stems[7]}.png"
  PIL.Image.fromarray(np.full((360, 480), 30, np.uint8)).save(label)
  config = tiny_train_config(total_steps=4, log_every=2, checkpoint_every=2)
  config.data.root, config.data.on_error = str(root), "skip"
  straight, metrics = train.train(config, tmp_path / "straight")
  assert metrics["skipped_records"] > 0  # In the log line (4 steps of 8: 3.2 epochs).
  train.train(config, tmp_path / "split", stop_after=2)
  resumed, _ = train.train(config, tmp_path / "split")
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(straight.params)),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
