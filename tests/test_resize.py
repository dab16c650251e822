import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlseg_jax.resize import resize_bicubic, resize_bilinear

SIZES = [((24, 24), (32, 32)), ((32, 32), (30, 30)), ((24, 24), (40, 40)), ((7, 9), (5, 4)),
         ((5, 3), (11, 13)), ((32, 32), (8, 8)), ((6, 6), (6, 9))]


@pytest.mark.parametrize("mode,fn", [("bicubic", resize_bicubic), ("bilinear", resize_bilinear)])
@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_matches_torch_interpolate(mode, fn, src, dst):
  x = np.random.default_rng(0).normal(size=(2, *src, 5)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode=mode,
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(fn(x, dst))
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_resize_other_axes_and_identity():
  x = np.random.default_rng(1).normal(size=(3, 7, 9)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x)[None], size=(4, 12), mode="bilinear",
                      align_corners=False)[0].numpy()
  np.testing.assert_allclose(np.asarray(resize_bilinear(x, (4, 12), spatial_axes=(1, 2))),
                             ref, atol=1e-5)
  assert resize_bicubic(x, (7, 9), spatial_axes=(1, 2)) is x
