import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mlseg_jax.checkpoint_rules import TIMM_DROPPED, timm_vit_rules
from mlseg_jax.convert import ConversionError, to_params
from mlseg_jax.models.vit import VARIANTS, ViT, resize_pos_embed

RNGS = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}


def _tiny(**kw):
  kw.setdefault("img_size", (64, 64))
  return ViT(variant="B/16", width_override=64, depth_override=2, heads_override=4, **kw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_the_right_shapes(variant):
  width, depth, _, patch = VARIANTS[variant]
  model = ViT(variant=variant, img_size=(64, 64))
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(x.shape)))
  (tokens, aux) = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape)), variables)
  grid = 64 // patch
  assert tokens.shape == (2, grid, grid, width) and tokens.dtype == jnp.float32
  assert aux["cls_token"].shape == (2, width)
  params = variables["params"]
  assert params["pos_embedding"].shape == (1, 1 + grid * grid, width)
  assert len([k for k in params if k.startswith("blocks_")]) == depth
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (width, 3 * width)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  x = jnp.ones((1, 32, 32, 3))
  variables = model.init(RNGS, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  tokens, _ = model.apply(variables, x)
  assert tokens.dtype == jnp.bfloat16


def test_odd_sizes_are_zero_padded_to_the_patch_grid():
  model = _tiny()
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 70, 50, 3))
  variables = model.init(RNGS, x)
  tokens, _ = model.apply(variables, x)
  assert tokens.shape == (1, 5, 4, 64)
  padded = jnp.pad(x, ((0, 0), (0, 10), (0, 14), (0, 0)))
  tokens_padded, _ = model.apply(variables, padded)
  np.testing.assert_allclose(tokens, tokens_padded, atol=1e-5)


def test_drop_path_only_in_training():
  model = _tiny(drop_path_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  variables = model.init(RNGS, x)
  run = lambda seed, train: model.apply(variables, x, train=train,
                                        rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  np.testing.assert_array_equal(run(0, False), run(1, False))
  np.testing.assert_array_equal(run(0, True), run(0, True))
  assert not np.allclose(run(0, True), run(1, True))
  no_drop = _tiny(drop_path_rate=0.0)
  np.testing.assert_allclose(no_drop.apply(variables, x, train=True)[0], run(0, False),
                             atol=1e-6)


def test_position_embedding_is_resized_at_forward_time():
  model = _tiny()  # Stored for 64x64: a 4x4 grid.
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 48, 48, 3))
  variables = model.init(RNGS, jnp.zeros((1, 64, 64, 3)))
  tokens, _ = model.apply(variables, x)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["pos_embedding"] = resize_pos_embed(params["pos_embedding"], (3, 3), (4, 4))
  tokens_ref, _ = _tiny(img_size=(48, 48)).apply({"params": params}, x)
  np.testing.assert_allclose(tokens, tokens_ref, atol=1e-6)


def test_class_tokens_oce_join_before_their_layer_without_position_embedding():
  import flax.linen as nn

  model = _tiny(num_class_tokens=3, class_token_start_layer=1, class_token_init="trunc_normal")
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 32, 32, 3))
  variables = model.init(RNGS, x)
  seen = {}

  def record_block_inputs(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and (context.module.name or "").startswith("blocks_"):
      seen[context.module.name] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_block_inputs):
    tokens, aux = model.apply(variables, x)
  assert tokens.shape == (2, 2, 2, 64) and aux["class_tokens"].shape == (2, 3, 64)
  assert seen["blocks_0"].shape == (2, 1 + 4, 64)  # Not yet joined.
  assert seen["blocks_1"].shape == (2, 1 + 4 + 3, 64)
  raw = np.broadcast_to(variables["params"]["cls_emb"], (2, 3, 64))
  np.testing.assert_array_equal(seen["blocks_1"][:, -3:], raw)  # No position embedding.
  zeros_init = _tiny(num_class_tokens=3, class_token_start_layer=1)
  assert float(jnp.abs(zeros_init.init(RNGS, x)["params"]["cls_emb"]).max()) == 0.0


def _timm_vit(depth=2, img_size=64):
  from timm.models.vision_transformer import VisionTransformer

  torch.manual_seed(0)
  model = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=768, depth=depth,
                            num_heads=12, num_classes=10).eval()
  with torch.no_grad():  # timm zero-inits some tensors; make every one count.
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


def test_parity_with_timm_vision_transformer():
  timm_model = _timm_vit()
  model = ViT(variant="B/16", depth_override=2, img_size=(64, 64), drop_path_rate=0.0)
  image = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  target = jax.eval_shape(lambda: model.init(RNGS, jnp.asarray(image)))["params"]
  params = to_params(timm_model.state_dict(), timm_vit_rules(2), target,
                     dropped=TIMM_DROPPED)
  tokens, aux = model.apply({"params": params}, image)
  with torch.no_grad():
    ref = timm_model.forward_features(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
  ref_patches = ref[:, 1:].reshape(2, 4, 4, 768)
  rel = np.linalg.norm(np.asarray(tokens) - ref_patches) / np.linalg.norm(ref_patches)
  assert rel < 1e-5, rel
  np.testing.assert_allclose(aux["cls_token"], ref[:, 0], atol=1e-4)


def test_timm_conversion_fails_loudly_on_bad_keys():
  timm_model = _timm_vit(depth=1)
  model = ViT(variant="B/16", depth_override=1, img_size=(64, 64))
  target = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 64, 64, 3))))["params"]
  sd = dict(timm_model.state_dict())
  with pytest.raises(ConversionError, match="unexpected key 'head.weight'"):
    to_params(sd, timm_vit_rules(1), target)
  missing = {k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.bias"}
  with pytest.raises(ConversionError, match="missing key 'blocks.0.attn.qkv.bias'"):
    to_params(missing, timm_vit_rules(1), target, dropped=TIMM_DROPPED)
  bad = dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(10, 768)})
  with pytest.raises(ConversionError, match="blocks.0.mlp.fc1.weight.*shape"):
    to_params(bad, timm_vit_rules(1), target, dropped=TIMM_DROPPED)
  extra = dict(sd, **{"blocks.7.norm1.weight": torch.zeros(768)})
  with pytest.raises(ConversionError, match="unexpected key 'blocks.7.norm1.weight'"):
    to_params(extra, timm_vit_rules(1), target, dropped=TIMM_DROPPED)


def test_timm_position_embedding_is_resized_on_load_like_mmseg():
  timm_model = _timm_vit(depth=1, img_size=96)  # 6x6 grid stored, model wants 4x4.
  model = ViT(variant="B/16", depth_override=1, img_size=(64, 64))
  target = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 64, 64, 3))))["params"]
  params = to_params(timm_model.state_dict(), timm_vit_rules(1), target,
                     dropped=TIMM_DROPPED)
  pe = timm_model.pos_embed.detach()
  grid = pe[:, 1:].reshape(1, 6, 6, 768).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
  ref = torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], 1).numpy()
  np.testing.assert_allclose(params["pos_embedding"], ref, atol=1e-5)
