import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from mlseg_jax.models.decoders import compute_losses
from mlseg_jax.models.segmenter import build_model, default_model_config
from mlseg_jax.resize import upsample_logits


def test_logits_at_one_sixteenth_and_upsampled_like_mmseg():
  model = build_model(tiny_model_config(decoder="mask_transformer"))
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 72, 50, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  out = model.apply(variables, images)
  assert out["logits"].shape == (2, 5, 4, 5)  # ceil(72/16), ceil(50/16)
  up = upsample_logits(out["logits"], (72, 50))
  ref = F.interpolate(torch.from_numpy(np.asarray(out["logits"])).permute(0, 3, 1, 2),
                      size=(72, 50), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(up, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize("decoder", ["mask_transformer", "linear"])
def test_training_loss_is_finite_and_differentiable(decoder):
  c = tiny_model_config(decoder=decoder)
  model = build_model(c)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, 32, 32), -1, 5)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images)["params"]

  def loss_fn(p):
    out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    return compute_losses(out, labels, c)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_bad_model_config_is_refused():
  c = tiny_model_config()
  c.backbone = "B/32"
  with pytest.raises(ValueError, match="model.backbone='B/32'"):
    build_model(c)
  c = tiny_model_config(decoder="fcn")
  with pytest.raises(ValueError, match="model.decoder='fcn'"):
    build_model(c)
  with pytest.raises(ValueError, match="model.attention_impl='flash'"):
    build_model(tiny_model_config(attention_impl="flash"))
  with pytest.raises(ValueError, match="needs model.dtype bfloat16"):
    build_model(tiny_model_config(attention_impl="cudnn"))


@pytest.mark.slow
def test_full_vit_b16_segmenter_runs_at_512():
  c = default_model_config()  # ViT-B/16, mask transformer, 150 classes.
  model = build_model(c)
  images = jnp.zeros((1, 512, 512, 3))
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images))()
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(variables))
  assert 95e6 < n_params < 110e6, n_params  # ViT-B (86M) + 2-layer decoder.
  out = jax.jit(lambda v, x: model.apply(v, x)["logits"])(variables,
                                                          jax.random.normal(jax.random.PRNGKey(1), images.shape))
  assert out.shape == (1, 32, 32, 150) and bool(jnp.isfinite(out).all())
