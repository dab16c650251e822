"""Every PIL image mode read as the reference's reader (mmcv.imread: OpenCV, IMREAD_COLOR)
reads the same file: training data, predict and the Python API share `image_to_rgb`."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from mlseg_jax import api
from mlseg_jax import errors
from mlseg_jax.data.datasets import decode_image, image_to_rgb
from mlseg_jax.evaluation import predict

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)


def _encode(im: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt)
  return buf.getvalue()


def _opencv(data: bytes) -> np.ndarray | None:
  """What the reference's reader makes of the file (RGB)."""
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  return None if bgr is None else bgr[..., ::-1]


def _rgba() -> Image.Image:
  alpha = RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)
  return Image.fromarray(np.dstack([RGB, alpha]), "RGBA")


def _rgb16_png() -> bytes:
  rgb16 = RNG.integers(0, 65536, RGB.shape).astype(np.uint16)
  return cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes()


# (mode as PIL opens the file, the file's bytes, largest difference from OpenCV's pixels).
# JPEG's CMYK -> RGB is libjpeg's in OpenCV and PIL's own here: one grey level apart.
CASES = {
    "L": (lambda: _encode(Image.fromarray(RGB[..., 0]), "PNG"), 0),
    "LA": (lambda: _encode(_rgba().convert("LA"), "PNG"), 0),
    "P": (lambda: _encode(Image.fromarray(RGB).convert("P"), "PNG"), 0),
    "1": (lambda: _encode(Image.fromarray(RGB[..., 0]).convert("1"), "PNG"), 0),
    "RGB": (lambda: _encode(Image.fromarray(RGB), "PNG"), 0),
    "RGBA": (lambda: _encode(_rgba(), "PNG"), 0),
    "CMYK": (lambda: _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), 1),
    "I;16": (lambda: _encode(Image.fromarray(GREY16), "PNG"), 0),
    "I;16 (TIFF)": (lambda: _encode(Image.fromarray(GREY16), "TIFF"), 0),
    "RGB (16-bit PNG)": (_rgb16_png, 0),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_each_mode_reads_as_opencv_reads_the_file(mode):
  make, tolerance = CASES[mode]
  data = make()
  assert Image.open(io.BytesIO(data)).mode == mode.split(" ")[0]
  ours, theirs = decode_image(data, "x"), _opencv(data)
  assert ours.dtype == np.uint8 and ours.shape == RGB.shape
  assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= tolerance


def test_16_bit_grey_keeps_its_high_byte_where_pil_saturates():
  ours = decode_image(_encode(Image.fromarray(GREY16), "PNG"), "x")
  np.testing.assert_array_equal(ours[..., 1], GREY16 >> 8)
  # PIL's own conversion clips every value above 255 to white (what predict did).
  assert (np.asarray(Image.fromarray(GREY16).convert("RGB"))[..., 0] == 255).mean() > 0.9


@pytest.mark.parametrize("mode, values, kind", [
    ("I", RNG.integers(0, 70000, (6, 5)).astype(np.int32), "32-bit integer"),
    ("F", RNG.random((6, 5)).astype(np.float32), "32-bit float"),
])
def test_32_bit_images_are_refused_as_opencv_refuses_them(mode, values, kind):
  data = _encode(Image.fromarray(values, mode), "TIFF")
  assert _opencv(data) is None
  with pytest.raises(errors.DataError, match=f"x.tif: {kind} samples \\(PIL mode {mode}\\)"):
    decode_image(data, "x.tif")
  with pytest.raises(errors.DataError, match=f"image 3: {kind} samples"):
    image_to_rgb(Image.fromarray(values, mode), "image 3")


def test_the_api_and_predict_read_a_16_bit_image_as_its_8_bit_version(tmp_path):
  (tmp_path / "grey16.png").write_bytes(_encode(Image.fromarray(GREY16), "PNG"))
  Image.fromarray((GREY16 >> 8).astype(np.uint8)).save(tmp_path / "grey8.png")
  files = predict._ImageFiles([tmp_path / "grey16.png", tmp_path / "grey8.png"])
  np.testing.assert_array_equal(files[0]["image"], files[1]["image"])
  np.testing.assert_array_equal(api._as_rgb(str(tmp_path / "grey16.png"), 0), files[1]["image"])
  np.testing.assert_array_equal(api._as_rgb(Image.fromarray(GREY16), 0), files[1]["image"])


def test_predict_names_a_32_bit_file_among_good_ones(tmp_path):
  Image.fromarray(RNG.random((6, 5)).astype(np.float32), "F").save(tmp_path / "depth.tif")
  Image.fromarray(RGB).save(tmp_path / "photo.png")
  files = predict._ImageFiles(predict.find_images(tmp_path))
  assert [f.name for f in files.files] == ["depth.tif", "photo.png"]
  files[0], files[1]
  assert list(files.failed) == [0] and "depth.tif: 32-bit float samples" in files.failed[0]
