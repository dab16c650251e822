"""A small window zero-padded to the crop, with `valid_grid`, gives in its own cells the
logits of the unpadded window (the evaluation's one program for every small window)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.segmenter import build_model
from mlseg_jax.models.vit import grid_mask

CROP = 96  # 6x6 token grid; the position embedding is stored for 4x4 (img_size 64).

CASES = [dict(decoder="mask_transformer"), dict(decoder="linear"),
         dict(decoder="mlseg", topk=3, pool_grid=2), dict(decoder="mlseg", topk=3, pool_grid=0),
         dict(decoder="mlseg", topk=3, pool_grid=4, oce=True, d_model=64),
         dict(decoder="mask_transformer", oce=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_padded_window_equals_unpadded(case):
  c = tiny_model_config(num_classes=6, **case)
  assert decoder_spec(c).masks_padding
  model = build_model(c)
  sizes = [(40, 56), (96, 33), (17, 96), (96, 96), (64, 80)]
  rng = np.random.default_rng(0)
  images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, CROP, CROP, 3)))["params"]
  padded = np.zeros((len(sizes), CROP, CROP, 3), np.float32)
  for i, x in enumerate(images):
    padded[i, :x.shape[0], :x.shape[1]] = x
  grids = np.array([(-(-h // 16), -(-w // 16)) for h, w in sizes], np.int32)
  out = jax.jit(lambda p, x, g: model.apply({"params": p}, x, valid_grid=g))(
      params, padded, grids)
  for i, x in enumerate(images):
    ref = model.apply({"params": params}, x[None])
    gh, gw = grids[i]
    np.testing.assert_allclose(out["logits"][i, :gh, :gw], ref["logits"][0], rtol=1e-4,
                               atol=1e-4, err_msg=f"window {sizes[i]}")
    assert not np.any(np.asarray(out["logits"][i])[gh:]) and not np.any(
        np.asarray(out["logits"][i])[:, gw:])
    if "image_logits" in ref:
      np.testing.assert_allclose(out["image_logits"][i], ref["image_logits"][0], rtol=1e-4,
                                 atol=1e-4)
      np.testing.assert_array_equal(out["topk_index"][i], ref["topk_index"][0])


def test_grid_mask():
  m = np.asarray(grid_mask(jnp.array([[2, 3], [1, 1]]), (3, 4))).reshape(2, 3, 4)
  assert m[0, :2, :3].all() and m[0].sum() == 6 and m[1, 0, 0] and m[1].sum() == 1


def test_heads_without_padding_masks_are_marked():
  for decoder in ("mlseg_trandec", "mlseg_pooling", "mlseg_gt"):
    assert not decoder_spec(tiny_model_config(decoder=decoder)).masks_padding
