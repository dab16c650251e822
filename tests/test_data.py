"""Dataset readers, label conventions, bad-input errors and the preparation tools."""

import json
import pathlib
import re

import numpy as np
import PIL.Image
import pytest
import scipy.io

from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax import IGNORE_LABEL
from mlseg_jax import data
from mlseg_jax import errors
from mlseg_jax.data import classes
from mlseg_jax.data import datasets
from mlseg_jax.data import prepare

SHARED = pathlib.Path(__file__).parents[2] / "shared" / "data"
SUBSET = QUICKSTART_DATA


def _config(name, root, **kw):
  c = data.default_config()
  c.name, c.root = name, str(root)
  for k, v in kw.items():
    c[k] = v
  return c


def _image(path, h=12, w=16, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  PIL.Image.fromarray(rgb).save(path)
  return rgb


def _label(path, values):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(values).save(path)


def _stored(h=12, w=16, values=(0, 1, 2)):
  """A label map cycling through `values` (so every value appears)."""
  return np.resize(np.asarray(values), h * w).reshape(h, w)


def test_ade20k_reads_uint8_pngs_with_reduce_zero_label(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  stored = _stored(values=(0, 1, 17, 150)).astype(np.uint8)
  for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
    _image(root / "images" / split / f"{stem}.jpg")
    _label(root / "annotations" / split / f"{stem}.png", stored)
  ds = data.get_dataset(_config("ade20k", tmp_path), "train")  # parent of the release folder
  rec = ds[0]
  assert rec["name"] == "ADE_train_00000001" and rec["image"].shape == (12, 16, 3)
  assert rec["label"].dtype == np.int32
  np.testing.assert_array_equal(rec["label"], np.where(stored == 0, -1, stored.astype(int) - 1))
  assert (ds.num_classes, ds.mean, ds.std) == (150, (127.5,) * 3, (127.5,) * 3)
  assert len(data.get_dataset(_config("ade20k", root), "validation")) == 1


def test_real_ade20k_samples_and_class_names():
  root = SHARED / "ade20k_samples"
  ds = data.get_dataset(_config("ade20k", root), "val")
  assert len(ds) == 3
  for i in range(3):
    rec = ds[i]
    raw = np.asarray(PIL.Image.open(
        root / "ADEChallengeData2016" / "annotations" / "validation" / f"{rec['name']}.png"))
    np.testing.assert_array_equal(rec["label"], np.where(raw == 0, -1, raw.astype(int) - 1))
    assert rec["image"].shape[:2] == raw.shape
  rows = (root / "objectInfo150.txt").read_text().splitlines()[1:]
  synonyms = [[s.strip() for s in row.split("\t")[4].split(",")] for row in rows]
  assert len(synonyms) == len(ds.class_names) == 150
  for name, row in zip(ds.class_names, synonyms):
    assert name in row or name == "television receiver", (name, row)


@pytest.mark.parametrize("root", [SHARED / "camvid", SUBSET])
def test_real_camvid_reads_with_void_as_ignore(root):
  train = data.get_dataset(_config("camvid", root), "train")
  val = data.get_dataset(_config("camvid", root), "val")
  assert len(train) > 0 and len(val) > 0
  rec = val[len(val) - 1]
  raw = np.asarray(PIL.Image.open(root / "labels" / "val" / f"{rec['name']}.png"))
  assert rec["image"].shape == (360, 480, 3)
  np.testing.assert_array_equal(rec["label"], np.where(raw == 255, IGNORE_LABEL, raw.astype(int)))
  assert train.class_names[0] == "sky" and train.num_classes == 11


def test_camvid_subset_size():
  assert len(list((SUBSET / "images" / "train").glob("*.jpg"))) == 32
  assert len(list((SUBSET / "images" / "val").glob("*.jpg"))) == 16


def test_ade20k_full_reads_uint16_tif_with_65535_ignored(tmp_path):
  root = tmp_path / "ADE20K_2021_17_01"
  stored = _stored(values=(0, 1, 846, 65535)).astype(np.uint16)
  _image(root / "images_detectron2" / "validation" / "ADE_frame_1.jpg")
  _label(root / "annotations_detectron2" / "validation" / "ADE_frame_1.tif", stored)
  ds = data.get_dataset(_config("ade20k_full", tmp_path), "val")
  np.testing.assert_array_equal(ds[0]["label"], np.where(stored == 65535, -1, stored.astype(int)))
  assert ds.num_classes == len(ds.class_names) == 847


def test_coco_lvis_reads_16bit_pngs_with_reduce_zero_label(tmp_path):
  stored = _stored(values=(0, 1, 700, 1284)).astype(np.uint16)
  _image(tmp_path / "images" / "val2017" / "000000000139.jpg")
  _label(tmp_path / "lvis_mask" / "val2017" / "000000000139.png", stored)
  ds = data.get_dataset(_config("coco_lvis", tmp_path), "val")
  np.testing.assert_array_equal(ds[0]["label"], np.where(stored == 0, -1, stored.astype(int) - 1))
  assert ds.num_classes == 1284 and ds.class_names[-1] == "wood"


def test_folder_dataset_with_user_conventions(tmp_path):
  rgb = _image(tmp_path / "images" / "a.png")
  _image(tmp_path / "images" / "b.png", seed=1)
  stored = _stored(values=(0, 3, 4, 9)).astype(np.uint8)
  _label(tmp_path / "labels" / "a.png", stored)
  _label(tmp_path / "labels" / "b.png", stored)
  ds = data.get_dataset(_config("folder", tmp_path, num_classes=4, ignore_value=9,
                                reduce_zero_label=True), "train")
  rec = ds[0]
  np.testing.assert_array_equal(rec["image"], rgb)  # PNG: lossless.
  np.testing.assert_array_equal(rec["label"], [[{0: -1, 3: 2, 4: 3, 9: -1}[v] for v in row]
                                               for row in stored])
  assert ds.class_names == ("class_0", "class_1", "class_2", "class_3")
  with pytest.raises(ValueError, match="num_classes"):
    data.get_dataset(_config("folder", tmp_path), "train")


def test_coco_stuff10k_prepare_from_mat_and_read(tmp_path):
  src, dst = tmp_path / "cocostuff-10k-v1.1", tmp_path / "coco_stuff10k"
  (src / "imageLists").mkdir(parents=True)
  (src / "annotations").mkdir()
  names = {"train": "COCO_train2014_000000000077", "test": "COCO_train2014_000000000078"}
  ids = _stored(values=(0, 1, 13, 92, 182)).astype(np.uint16)  # COCO ids, 0 = unlabeled.
  for lst, name in names.items():
    (src / "imageLists" / f"{lst}.txt").write_text(name + "\n")
    _image(src / "images" / f"{name}.jpg")
    # The official field layout: S (label map), names (182 class names), captions.
    scipy.io.savemat(src / "annotations" / f"{name}.mat", {
        "S": ids, "names": np.array([[f"c{i}"] for i in range(182)], dtype=object),
        "captions": np.array([["a caption"]], dtype=object)})
  assert prepare.prepare_coco_stuff10k(src, dst) == {"train2014": 1, "test2014": 1}
  png = dst / "annotations" / "train2014" / f"{names['train']}_labelTrainIds.png"
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(png)),
                                np.vectorize({0: 0, 1: 1, 13: 12, 92: 81, 182: 171}.get)(ids))
  ds = data.get_dataset(_config("coco_stuff10k", dst), "val")
  label = ds[0]["label"]
  assert ds.split == "test2014" and ds.num_classes == 171
  np.testing.assert_array_equal(
      label, np.vectorize({0: -1, 1: 0, 13: 11, 92: 80, 182: 170}.get)(ids))
  assert [ds.class_names[i] for i in (0, 11, 80, 170)] == ["person", "stop sign", "banner",
                                                          "wood"]
  scipy.io.savemat(src / "annotations" / f"{names['train']}.mat", {"S": ids + 12})  # 12: unused
  with pytest.raises(ValueError, match=r"COCO_train2014_000000000077.mat.*\[12"):
    prepare.prepare_coco_stuff10k(src, dst)


def _rle_string(mask):
  """COCO compressed RLE of a bool mask (column-major runs, delta-coded, 5-bit groups)."""
  flat = mask.T.ravel().astype(np.int8)
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  runs = np.diff(np.concatenate([[0], change])).tolist()  # Starts with 0 when flat[0] is 1.
  out = []
  for i, x in enumerate(runs):
    if i > 2:
      x -= runs[i - 2]
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = not ((c & 0x10 == 0 and x == 0) or (c & 0x10 and x == -1))
      if more:
        c |= 0x20
      out.append(chr(c + 48))
  return "".join(out)


def test_rle_helper_round_trips():
  for seed in range(4):
    mask = np.random.default_rng(seed).random((9, 7)) > 0.6
    rle = {"size": [9, 7], "counts": _rle_string(mask)}
    np.testing.assert_array_equal(prepare.decode_rle(rle, "t"), mask)
  # By hand: 2x3, ones at column-major 1, 2, 5: runs 1, 2, 2, 1; the 4th is stored as
  # 1 - 2 = -1, the 5-bit group 31 with the sign bit set, "O".
  np.testing.assert_array_equal(prepare.decode_rle({"size": [2, 3], "counts": "122O"}, "t"),
                                [[0, 1, 0], [1, 0, 1]])


def test_pascal_context_prepare_from_detail_json_and_read(tmp_path):
  voc = tmp_path / "VOCdevkit" / "VOC2010"
  h, w = 12, 16
  yy, xx = np.mgrid[:h, :w]
  sky = yy < 4  # category 259 (mountain) -> index 35
  plane = (yy >= 3) & (xx < 8)  # category 2 -> index 1, painted over sky's last row.
  other = (yy >= 8) & (xx >= 8)  # category 12: not one of the 59 -> background 0.
  images, anns = [], []
  for image_id, stem, phase in ((2008000002, "2008_000002", "train"),
                                (2008000003, "2008_000003", "val")):
    _image(voc / "JPEGImages" / f"{stem}.jpg")
    images.append({"file_name": f"{stem}.jpg", "image_id": image_id, "phase": phase,
                   "height": h, "width": w})
    for k, (cat, m) in enumerate(((259, sky), (2, plane), (12, other))):
      anns.append({"id": image_id * 10 + k, "image_id": image_id, "category_id": cat,
                   "segmentation": {"size": [h, w], "counts": _rle_string(m)}, "parts": []})
  json_path = tmp_path / "trainval_merged.json"
  json_path.write_text(json.dumps({"images": images, "annos_segmentation": anns,
                                   "categories": [], "parts": [], "annos_occlusion": []}))
  assert prepare.prepare_pascal_context(json_path, voc) == {"train": 1, "val": 1}
  expected = np.zeros((h, w), np.int64)
  expected[sky] = 35
  expected[plane] = 1
  ds = data.get_dataset(_config("pascal_context", tmp_path / "VOCdevkit"), "train")
  assert ds.class_names[35] == "mountain" and ds.class_names[1] == "aeroplane"
  np.testing.assert_array_equal(ds[0]["label"], expected)
  assert (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text() == "2008_000003\n"


def test_pack_to_array_record_reads_the_same(tmp_path):
  config = _config("camvid", SUBSET)
  files = data.get_dataset(config, "val")
  prepare.main(["pack", "--dataset", "camvid", "--src", str(SUBSET), "--dst",
                str(tmp_path / "packed"), "--splits", "val", "--records_per_file", "5"])
  assert len(list((tmp_path / "packed").glob("val-*.array_record"))) == 4
  packed = data.get_dataset(_config("camvid", tmp_path / "packed", format="array_record"), "val")
  assert len(packed) == len(files)
  for i in (0, 7, len(files) - 1):
    a, b = files[i], packed[i]
    assert a["name"] == b["name"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  with pytest.raises(ValueError, match="packed from dataset 'camvid'"):
    data.get_dataset(_config("folder", tmp_path / "packed", format="array_record",
                             num_classes=11), "val")


def test_tfds_array_record_dataset_as_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  labels = [rng.integers(0, 4, (10, 14), dtype=np.uint8) for _ in range(3)]

  class MlsegTinySeg(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, lab in enumerate(labels):  # PIL images: encoding them needs no TensorFlow.
        yield i, {"image": PIL.Image.fromarray(rng.integers(0, 256, (10, 14, 3), np.uint8)),
                  "segmentation_mask": PIL.Image.fromarray(lab), "file_name": f"img{i}"}

  MlsegTinySeg(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config("tfds", "", tfds_name="mlseg_tiny_seg", tfds_data_dir=str(tmp_path),
                   num_classes=3, ignore_value=3)
  ds = data.get_dataset(config, "train")
  assert len(ds) == 3
  for i in range(3):
    rec = ds[i]
    lab = labels[int(rec["name"][3:])]
    np.testing.assert_array_equal(rec["label"], np.where(lab == 3, -1, lab.astype(int)))
    assert rec["image"].shape == (10, 14, 3) and rec["image"].dtype == np.uint8
  with pytest.raises(ValueError, match="instance"):
    data.get_dataset(_config("tfds", "", tfds_name="scene_parse150", num_classes=150), "train")


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file (or folder) at fault.

def _camvid_like(root, n=2, h=12, w=16):
  for i in range(n):
    _image(root / "images" / "train" / f"f{i}.jpg", h, w)
    _label(root / "labels" / "train" / f"f{i}.png", _stored(h, w).astype(np.uint8))


def test_missing_label_is_named(tmp_path):
  _camvid_like(tmp_path)
  (tmp_path / "labels" / "train" / "f1.png").unlink()
  with pytest.raises(ValueError, match=r"no label map.*f1\.jpg"):
    data.get_dataset(_config("camvid", tmp_path), "train")


def test_label_without_image_is_named(tmp_path):
  _camvid_like(tmp_path)
  (tmp_path / "images" / "train" / "f0.jpg").unlink()
  with pytest.raises(ValueError, match=r"without an image.*f0\.png"):
    data.get_dataset(_config("camvid", tmp_path), "train")


def test_size_mismatch_is_named(tmp_path):
  _camvid_like(tmp_path)
  _label(tmp_path / "labels" / "train" / "f1.png", _stored(10, 16).astype(np.uint8))
  ds = data.get_dataset(_config("camvid", tmp_path), "train")
  with pytest.raises(ValueError, match=r"f1\.jpg is 16x12.*f1\.png is 16x10"):
    ds[1]


def test_out_of_range_label_is_named(tmp_path):
  _camvid_like(tmp_path)
  _label(tmp_path / "labels" / "train" / "f0.png", _stored(values=(3, 11, 254)).astype(np.uint8))
  ds = data.get_dataset(_config("camvid", tmp_path), "train")
  with pytest.raises(ValueError, match=r"f0\.png: label values \[11, 254\] are out of range"):
    ds[0]


def test_corrupt_image_is_named(tmp_path):
  _camvid_like(tmp_path)
  path = tmp_path / "images" / "train" / "f1.jpg"
  path.write_bytes(path.read_bytes()[:40])
  ds = data.get_dataset(_config("camvid", tmp_path), "train")
  with pytest.raises(ValueError, match=r"f1\.jpg: cannot read the image"):
    ds[1]


def test_empty_split_and_unknown_name(tmp_path):
  (tmp_path / "images" / "train").mkdir(parents=True)
  (tmp_path / "labels" / "train").mkdir(parents=True)
  with pytest.raises(ValueError, match="empty"):
    data.get_dataset(_config("camvid", tmp_path), "train")
  with pytest.raises(ValueError, match=r"images/val: the image folder does not exist"):
    data.get_dataset(_config("camvid", tmp_path), "val")
  with pytest.raises(ValueError, match="unknown dataset 'cityscapes'"):
    data.get_dataset(_config("cityscapes", tmp_path), "train")


def test_label_tables_match_their_class_lists():
  for name, info in datasets.INFOS.items():
    assert len(info.class_names) == len(info.palette) == info.num_classes, name
  assert classes.voc_colormap(3) == ((0, 0, 0), (128, 0, 0), (0, 128, 0))


# ---------------------------------------------------------------------------------------------
# Image formats and files without a partner.

# layout -> (image path less its suffix, label path, split) of record "x".
_LAYOUT_FILES = {
    "ade20k": ("ADEChallengeData2016/images/training/x",
               "ADEChallengeData2016/annotations/training/x.png", "train"),
    "coco_stuff10k": ("images/train2014/x", "annotations/train2014/x_labelTrainIds.png", "train"),
    "pascal_context": ("VOC2010/JPEGImages/x", "VOC2010/SegmentationClassContext/x.png", "train"),
    "ade20k_full": ("ADE20K_2021_17_01/images_detectron2/training/x",
                    "ADE20K_2021_17_01/annotations_detectron2/training/x.tif", "train"),
    "coco_lvis": ("images/train2017/x", "lvis_mask/train2017/x.png", "train"),
    "camvid": ("images/train/x", "labels/train/x.png", "train"),
}


@pytest.mark.parametrize("name,suffix", [(name, ".png") for name in sorted(_LAYOUT_FILES)]
                         + [("camvid", s) for s in (".jpeg", ".bmp", ".webp", ".TIF")])
def test_every_layout_reads_images_of_any_format(tmp_path, name, suffix):
  image, label, split = _LAYOUT_FILES[name]
  rgb = _image(tmp_path / f"{image}{suffix}")
  _label(tmp_path / label, _stored(values=(1, 2)).astype(np.uint8))
  if name == "pascal_context":
    (tmp_path / "VOC2010" / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (tmp_path / "VOC2010" / "ImageSets" / "SegmentationContext" / "train.txt").write_text("x\n")
  rec = data.get_dataset(_config(name, tmp_path), split)[0]
  assert rec["name"] == "x" and rec["image"].shape == (12, 16, 3)
  if suffix in (".png", ".bmp", ".TIF"):  # Lossless as PIL writes them.
    np.testing.assert_array_equal(rec["image"], rgb)


def test_a_missing_partner_names_the_suffixes_looked_for_and_a_file(tmp_path):
  _camvid_like(tmp_path, n=3)
  (tmp_path / "images" / "train" / "f0.jpg").unlink()
  labels = tmp_path / "labels" / "train"
  with pytest.raises(errors.DataError) as e:
    data.get_dataset(_config("camvid", tmp_path), "train")
  assert str(e.value) == (
      f"{labels}: 1 label maps without an image in {tmp_path / 'images' / 'train'}, e.g. "
      f"{labels / 'f0.png'}: no image {tmp_path / 'images' / 'train' / 'f0'}"
      "{.jpg,.jpeg,.png,.bmp,.tif,.tiff,.webp}")
  (labels / "f1.png").unlink()
  (labels / "f2.png").unlink()
  with pytest.raises(errors.DataError, match=re.escape(
      f"{labels}: no label map for 2 images, e.g. {tmp_path / 'images' / 'train' / 'f1.jpg'}: "
      f"no label map {labels / 'f1.png'}; also ['{tmp_path / 'images' / 'train' / 'f2.jpg'}']")):
    data.get_dataset(_config("camvid", tmp_path), "train")


def test_files_without_a_partner_can_be_left_out_and_listed(tmp_path):
  _camvid_like(tmp_path, n=3)
  (tmp_path / "labels" / "train" / "f1.png").unlink()
  _image(tmp_path / "images" / "train" / "f0.png")  # A second image for f0.
  ds = data.get_dataset(_config("camvid", tmp_path), "train", skip_unpaired=True)
  assert [name for _, _, name in ds.pairs] == ["f0", "f2"]
  assert [(pathlib.Path(f).name, why.split(": ", 1)[1]) for f, why in ds.unpaired] == [
      ("f1.jpg", f"no label map {tmp_path / 'labels' / 'train' / 'f1.png'}"),
      ("f0.png", f"a second image file for 'f0' (the first is "
                 f"{tmp_path / 'images' / 'train' / 'f0.jpg'}); it is left out")]


def test_on_error_is_raise_by_default_and_refuses_other_values():
  config = data.default_config()
  assert datasets.on_error_mode(config) == "raise"
  config.on_error = "ignore"
  with pytest.raises(errors.ConfigError, match=r"data.on_error='ignore' must be one of 'raise', "
                                               r"'skip'"):
    datasets.on_error_mode(config)
