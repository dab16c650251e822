"""Attention: every model's calls satisfy cuDNN's fused-kernel limits, so
`attention_impl="cudnn"` does not fail on a GPU (checked here on the CPU by recording the
calls); the +GT head's key lengths equal a boolean key mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from mlseg_jax.models.decoders import compute_losses
from mlseg_jax.models import vit
from mlseg_jax.models.segmenter import build_model

_REAL_ATTENTION = jax.nn.dot_product_attention


def _cudnn_recorder(calls):
  """jax.nn.dot_product_attention that checks the limits jax's cuDNN path enforces
  (jax/_src/cudnn/fused_attention_stablehlo.py: check_layout, check_is_flash_attention,
  combine_bias_and_mask), then computes with XLA."""

  def attention(query, key, value, bias=None, mask=None, *, implementation=None,
                key_value_seq_lengths=None, **kwargs):
    if implementation == "cudnn":
      assert query.ndim == key.ndim == value.ndim == 4, "cuDNN wants (B, T, N, H)"
      assert query.dtype in (jnp.bfloat16, jnp.float16), query.dtype
      assert query.dtype == key.dtype == value.dtype
      head_dim = query.shape[-1]
      assert head_dim % 8 == 0 and head_dim <= 128, head_dim  # 128: pre-Hopper's limit
      # A mask reaches cuDNN as a bias of shape (B, N, T, S); a broadcast (B, 1, 1, S)
      # one fails check_layout, and any bias needs even T and S when training.
      assert mask is None and bias is None, "use key_value_seq_lengths"
      if key_value_seq_lengths is not None:
        assert key_value_seq_lengths.dtype == jnp.int32
        assert key_value_seq_lengths.shape == (query.shape[0],)
      calls.append((query.shape, key_value_seq_lengths is not None))
    return _REAL_ATTENTION(query, key, value, bias, mask, implementation="xla",
                           key_value_seq_lengths=key_value_seq_lengths, **kwargs)

  return attention


@pytest.mark.parametrize("decoder,oce", [
    ("mask_transformer", False), ("mlseg", False), ("mlseg", True),
    ("mlseg_trandec", False), ("mlseg_pooling", False), ("mlseg_gt", False)])
def test_cudnn_attention_calls_fit_the_fused_kernel(monkeypatch, decoder, oce):
  calls = []
  monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_recorder(calls))
  c = tiny_model_config(decoder=decoder, num_classes=6, topk=3, oce=oce,
                        dtype="bfloat16", attention_impl="cudnn")
  model = build_model(c)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 48, 48, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, 48, 48), -1, 6)
  labels = labels.at[0].set(jnp.where(labels[0] > 2, 1, labels[0]))  # a smaller set
  # Traced, not computed: the recorder checks the shapes and dtypes each call is traced
  # with, which are what cuDNN is handed (the values are XLA's, tested elsewhere).
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(2), images,
                                             labels=labels))["params"]
  out = jax.eval_shape(lambda p: model.apply({"params": p}, images, labels=labels), params)
  assert out["logits"].shape == (2, 48 // 16, 48 // 16, 6), out["logits"].shape

  def loss_fn(p):
    out = model.apply({"params": p}, images, train=True, labels=labels,
                      rngs={"dropout": jax.random.PRNGKey(3)})
    return compute_losses(out, labels, c)[0]

  loss, grads = jax.eval_shape(jax.value_and_grad(loss_fn), params)
  assert loss.shape == () and jax.tree.structure(grads) == jax.tree.structure(params)
  depth = c.backbone_depth
  assert len(calls) >= 2 * depth  # the ViT's blocks in both passes, at least
  assert any(has_lengths for _, has_lengths in calls) == (decoder == "mlseg_gt")


def test_key_lengths_hide_the_keys_past_them():
  attn = vit.SelfAttention(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
  lengths = jnp.array([7, 4, 1], jnp.int32)
  params = attn.init(jax.random.PRNGKey(1), x, train=False)
  got = attn.apply(params, x, train=False, kv_seqlen=lengths)
  # The visible queries see what they see with the hidden tokens cut from the sequence.
  for i, n in enumerate(np.asarray(lengths)):
    short = attn.apply(params, x[i:i + 1, :n], train=False)
    np.testing.assert_allclose(got[i, :n], short[0], rtol=1e-5, atol=1e-6)


def test_key_lengths_hide_keys_on_the_dropout_path_too():
  # Training with attention dropout computes the probabilities explicitly.
  attn = vit.SelfAttention(num_heads=2, dropout=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
  params = attn.init(jax.random.PRNGKey(1), x, train=False)
  lengths = jnp.array([4, 4, 4], jnp.int32)
  run = lambda t: attn.apply(params, t, train=True, kv_seqlen=lengths,
                             rngs={"dropout": jax.random.PRNGKey(2)})
  moved = run(x.at[:, 4:].set(1e3))  # the hidden tokens change wildly
  np.testing.assert_allclose(moved[:, :4], run(x)[:, :4], rtol=1e-5, atol=1e-5)
  assert not np.allclose(moved[:, 4:], run(x)[:, 4:])


class _FakeDevice:
  def __init__(self, platform, version):
    self.platform = platform
    self.client = type("Client", (), {"platform_version": version})()


@pytest.mark.parametrize("platform,version,dtype,expected", [
    ("gpu", "cuda 12080", "bfloat16", "cudnn"),
    ("gpu", "cuda 12080", "float16", "cudnn"),
    ("gpu", "cuda 12080", "float32", "xla"),  # cuDNN has no float32 flash kernel.
    ("gpu", "rocm 60300", "bfloat16", "xla"),
    ("tpu", "PJRT C API", "bfloat16", "xla"),
    ("cpu", "cpu", "bfloat16", "xla")])
def test_default_attention_is_cudnn_on_nvidia_gpus_in_half_precision(
    monkeypatch, platform, version, dtype, expected):
  from mlseg_jax.models import segmenter

  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(platform, version)])
  assert segmenter.resolve_attention_impl(None, dtype) == expected
  assert segmenter.resolve_attention_impl("xla", dtype) == "xla"  # An explicit choice stays.


def test_build_model_resolves_the_default_attention_without_touching_the_config():
  c = tiny_model_config(dtype="bfloat16")
  model = build_model(c)
  assert model.backbone.attention_impl == "xla"  # The CPU.
  assert c.attention_impl is None


def test_keep_mask_keeps_one_minus_rate_and_uses_both_halves_of_each_word():
  rate = 0.1
  shape = (4, 3, 257, 301)  # odd last axis: the second halves are cut to it
  keep = vit.keep_mask(jax.random.PRNGKey(0), rate, shape)
  assert keep.shape == shape and keep.dtype == jnp.bool_
  n = keep.size
  kept = float(keep.mean())
  p = round(0.9 * 65536) / 65536
  assert abs(kept - p) < 5 * np.sqrt(p * (1 - p) / n), kept
  # The two decisions a word makes are independent: as often both kept as p^2.
  half = (shape[-1] + 1) // 2
  first, second = np.asarray(keep[..., :half - 1]), np.asarray(keep[..., half:2 * half - 1])
  both = float((first & second).mean())
  assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / first.size), both
  np.testing.assert_array_equal(keep, vit.keep_mask(jax.random.PRNGKey(0), rate, shape))
  assert not np.array_equal(keep, vit.keep_mask(jax.random.PRNGKey(1), rate, shape))


def test_dropout_scales_what_it_keeps_and_is_the_identity_when_deterministic():
  x = jnp.ones((2, 64, 33))
  drop = vit.Dropout(0.25)
  out = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  assert set(np.unique(np.asarray(out)).tolist()) == {0.0, float(np.float32(1 / 0.75))}
  assert abs(float((out == 0).mean()) - 0.25) < 0.02
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(vit.Dropout(0.0).apply({}, x, deterministic=False), x)


def test_dropout_attention_gradients_equal_those_without_recomputation():
  # The keep mask is saved across the recomputation: the gradients are those of the plain
  # (stored) computation, the same mask in both passes.
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 9, 3, 8)) for i in range(3))
  rng = jax.random.PRNGKey(7)
  attend = lambda q, k, v: vit._dropout_attention(q, k, v, None, None, rng, rate=0.1,
                                                  dtype=jnp.float32)
  remat = jax.checkpoint(attend, policy=vit._KEEP_MASK)
  loss = lambda f: lambda *a: (f(*a) ** 2).sum()
  got = jax.grad(loss(remat), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
