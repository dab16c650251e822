import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mlseg_jax.checkpoint_rules import mask_transformer_rules
from mlseg_jax.convert import ConversionError, to_params
from mlseg_jax.models.mask_transformer import LinearDecoder, MaskTransformer
from torch_twins import TwinMaskTransformer, randomize_

N_CLS, D_ENC, D, HEADS, LAYERS = 7, 48, 64, 4, 2


def _pair(seed=0):
  torch.manual_seed(seed)
  twin = randomize_(TwinMaskTransformer(N_CLS, D_ENC, LAYERS, HEADS, D, 4 * D)).eval()
  model = MaskTransformer(num_classes=N_CLS, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                          d_ff=4 * D)
  target = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 5, D_ENC))))["params"]
  params = to_params(twin.state_dict(), mask_transformer_rules(LAYERS, prefix="", path=()),
                     target)
  return twin, model, params


@pytest.mark.parametrize("batch", [1, 3])
def test_masks_match_the_reference_twin(batch):
  twin, model, params = _pair()
  tokens = np.random.default_rng(batch).normal(size=(batch, 3, 5, D_ENC)).astype(np.float32)
  out = model.apply({"params": params}, tokens)["logits"]  # (B, 3, 5, n_cls)
  with torch.no_grad():
    ref = twin(torch.from_numpy(tokens).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert out.shape == (batch, 3, 5, N_CLS)
  rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
  assert rel < 1e-5, rel


def test_dropout_acts_only_in_training():
  _, model, params = _pair()
  tokens = jnp.ones((2, 3, 5, D_ENC))
  run = lambda seed, train: model.apply({"params": params}, tokens, train=train,
                                        rngs={"dropout": jax.random.PRNGKey(seed)})["logits"]
  np.testing.assert_array_equal(run(0, False), run(1, False))
  assert not np.allclose(run(0, True), run(1, True))


def test_class_embeddings_from_the_backbone_replace_cls_emb():
  model = MaskTransformer(num_classes=N_CLS, d_model=D, n_layers=1, n_heads=HEADS, d_ff=4 * D)
  tokens, class_emb = jnp.ones((2, 3, 5, D_ENC)), jnp.ones((2, N_CLS, D))
  params = model.init(jax.random.PRNGKey(0), tokens, class_emb)["params"]
  assert "cls_emb" not in params
  assert model.apply({"params": params}, tokens, class_emb)["logits"].shape == (2, 3, 5, N_CLS)


def test_reference_names_fail_loudly_on_bad_keys():
  twin, model, params = _pair()
  sd = dict(twin.state_dict())
  target = jax.tree_util.tree_map(jnp.asarray, params)
  rules = mask_transformer_rules(LAYERS, prefix="", path=())
  with pytest.raises(ConversionError, match="missing key 'mask_norm.bias'"):
    to_params({k: v for k, v in sd.items() if k != "mask_norm.bias"}, rules, target)
  with pytest.raises(ConversionError, match="unexpected key 'decoder_norm2.weight'"):
    to_params(dict(sd, **{"decoder_norm2.weight": torch.ones(D)}), rules, target)
  with pytest.raises(ConversionError, match="'cls_emb': shape"):
    to_params(dict(sd, cls_emb=torch.ones(1, N_CLS + 1, D)), rules, target)


def test_linear_decoder_maps_tokens_to_classes():
  model = LinearDecoder(num_classes=N_CLS)
  tokens = jnp.ones((2, 3, 5, D_ENC))
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  assert params["head"]["kernel"].shape == (D_ENC, N_CLS)
  assert model.apply({"params": params}, tokens)["logits"].shape == (2, 3, 5, N_CLS)
