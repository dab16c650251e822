import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conftest import tiny_model_config
from mlseg_jax.convert import checkpoint_layout, flatten
from mlseg_jax.models.decoders import DECODERS
from mlseg_jax.models.segmenter import abstract_params, build_model, default_model_config
from mlseg_jax.optimizer import (decay_multipliers, default_optim_config, make_optimizer,
                                 poly_schedule, reference_name)

MLSEG_KEYS = {"pos_embed": 0.0, "cls_token": 0.0, "norm": 0.0,
              "decode_head.blocks.0.": 100.0, "decode_head.ml_fc": 100.0}


def _vit_b_mlseg_params():
  c = default_model_config()
  c.decoder, c.n_layers, c.num_classes, c.topk = "mlseg", 3, 150, 50
  model = build_model(c)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 512, 512, 3))))["params"]


def test_paramwise_decay_on_the_vit_b_mlseg_tree():
  params = _vit_b_mlseg_params()
  mults = {"/".join(p): m for p, m in flatten(decay_multipliers(params, MLSEG_KEYS)).items()}
  expected = {
      "backbone/pos_embedding": 0.0,  # backbone.pos_embed
      "backbone/cls": 0.0,  # backbone.cls_token
      "backbone/blocks_0/norm1/scale": 1.0,  # backbone.layers.0.ln1.weight: "norm" misses.
      "backbone/norm/scale": 1.0,  # backbone.ln1.weight (the final norm)
      "backbone/blocks_3/attn/qkv/kernel": 1.0,
      "backbone/embedding/kernel": 1.0,
      "decode_head/blocks_0/norm1/scale": 100.0,  # Longest key wins over "norm".
      "decode_head/blocks_0/attn/qkv/kernel": 100.0,
      "decode_head/blocks_1/norm2/bias": 0.0,
      "decode_head/blocks_2/mlp/fc1/kernel": 1.0,
      "decode_head/decoder_norm/scale": 0.0,
      "decode_head/decoder_norm2/scale": 0.0,
      "decode_head/mask_norm/scale": 0.0,
      "decode_head/proj_dec/kernel": 1.0,
      "decode_head/cls_emb": 1.0,
      "decode_head/proj_patch": 1.0,
  }
  for path, want in expected.items():
    assert mults[path] == want, (path, reference_name(tuple(path.split("/"))), mults[path])
  ml_fc = [p for p in mults if p.startswith("decode_head/ml_fc/")]
  assert ml_fc and all(mults[p] == 100.0 for p in ml_fc)
  assert set(mults.values()) == {0.0, 1.0, 100.0}


def test_reference_names_of_the_backbone():
  assert reference_name(("backbone", "blocks_11", "attn", "qkv", "kernel")) == \
      "backbone.layers.11.attn.attn.in_proj_weight"
  assert reference_name(("backbone", "blocks_2", "mlp", "fc1", "bias")) == \
      "backbone.layers.2.ffn.layers.0.0.bias"
  assert reference_name(("decode_head", "blocks_1", "norm2", "scale")) == \
      "decode_head.blocks.1.norm2.weight"
  with pytest.raises(ValueError, match="no reference name"):
    reference_name(("backbone", "mystery"))


@pytest.mark.parametrize("oce", [False, True])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_every_parameter_is_named_as_the_converter_names_it(decoder, oce):
  c = tiny_model_config(decoder, topk=3, oce=oce)
  names = {r.path: r.torch_key for r in checkpoint_layout("reference", c).rules}
  assert sorted(names) == sorted(flatten(abstract_params(c)))
  for path, name in names.items():
    assert reference_name(path) == name


def test_poly_schedule_matches_mmcv():
  sched = poly_schedule(0.001, 160_000, 0.9, 1e-5)
  for step in (0, 1, 80_000, 159_999, 160_000):
    want = (0.001 - 1e-5) * (1 - step / 160_000) ** 0.9 + 1e-5
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)


def test_sgd_with_paramwise_decay_matches_torch_sgd():
  """Three steps of our SGD == torch.optim.SGD with per-group weight decay and poly lr."""
  rng = np.random.default_rng(0)
  params = {"backbone": {"pos_embedding": rng.normal(size=(1, 5, 4)).astype(np.float32),
                         "blocks_0": {"attn": {"qkv": {"kernel": rng.normal(size=(4, 12)).astype(np.float32)}}}},
            "decode_head": {"blocks_0": {"norm1": {"scale": rng.normal(size=(4,)).astype(np.float32)}}}}
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(3)]
  c = default_optim_config()
  c.weight_decay = 1e-2
  c.decay_mult = tuple(MLSEG_KEYS.items())
  tx, sched = make_optimizer(c, params, total_steps=10)
  state = tx.init(params)
  ours = params
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)

  flat = flatten(params)
  mults = flatten(decay_multipliers(params, MLSEG_KEYS))
  tensors = {p: torch.tensor(v, requires_grad=True) for p, v in flat.items()}
  opt = torch.optim.SGD([{"params": [t], "weight_decay": 1e-2 * mults[p]} for p, t in tensors.items()],
                        lr=0.001, momentum=0.9)
  for i, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = float(sched(i))
    fg = flatten(g)
    for p, t in tensors.items():
      t.grad = torch.tensor(fg[p])
    opt.step()
  for p, v in flatten(ours).items():
    np.testing.assert_allclose(v, tensors[p].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_is_refused():
  c = default_optim_config()
  c.name = "lamb"
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    make_optimizer(c, {"w": jnp.zeros(3)}, 10)
