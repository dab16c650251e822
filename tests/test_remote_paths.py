"""Datasets on GCS-style paths: read through etils.epath, each host its own slice.

An in-memory fsspec filesystem stands in for `gs://` (what gcsfs provides on a pod), so the
same code path runs here without a network.
"""

import importlib

import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax import data


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  store = {}  # Its own bucket contents, not the memory:// filesystem's.
  pseudo_dirs = [""]


@pytest.fixture
def gcs_camvid(monkeypatch):
  registry = importlib.import_module("fsspec.registry")  # The module, not its mapping.

  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry._registry, name, FakeGCS)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  src, dst = QUICKSTART_DATA, epath.Path("gs://bucket/camvid")
  for split in ("train", "val"):
    for kind in ("images", "labels"):
      (dst / kind / split).mkdir(parents=True, exist_ok=True)
      for f in sorted((src / kind / split).iterdir())[:6]:
        (dst / kind / split / f.name).write_bytes(f.read_bytes())
  yield "gs://bucket/camvid"
  FakeGCS.store.clear()


def _config(root):
  c = data.default_config()
  c.root = root
  c.crop_size = (64, 64)
  c.img_scale = (120, 90)
  return c


def test_dataset_on_a_gcs_path_reads_like_the_local_one(gcs_camvid):
  remote = data.get_dataset(_config(gcs_camvid), "train")
  local = data.get_dataset(_config(str(QUICKSTART_DATA)), "train")
  assert len(remote) == 6
  for i in range(len(remote)):
    r = remote[i]
    l = [local[j] for j in range(len(local)) if local[j]["name"] == r["name"]][0]
    np.testing.assert_array_equal(r["image"], l["image"])
    np.testing.assert_array_equal(r["label"], l["label"])


def test_each_host_reads_its_own_slice_from_gcs(gcs_camvid):
  config = _config(gcs_camvid)
  batches = [next(data.make_train_iterator(config, 4, 0, process_index=p, process_count=2))
             for p in range(2)]
  whole = next(data.make_train_iterator(config, 4, 0, process_index=0, process_count=1))
  assert batches[0]["image"].shape == (2, 64, 64, 3)
  together = np.concatenate([b["label"] for b in batches])
  assert sorted(map(bytes, together.reshape(4, -1))) == sorted(map(bytes, whole["label"].reshape(4, -1)))
