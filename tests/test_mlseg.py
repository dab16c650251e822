"""MLSeg: top-k selection, targets, losses, +GT, OCE and gradients (tiny shapes, CPU).

Compilation dominates on a CPU, so models run jitted and their parameters are drawn in
numpy from `eval_shape` (non-trivial LayerNorms too) instead of compiling `init`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from mlseg_jax import IGNORE_LABEL, checkpoint_rules, convert, losses
from mlseg_jax.models import decoders, mlseg, mlseg_gt, segmenter

N_CLS, TOPK = 12, 5


def _config(decoder="mlseg", **kw):
  kw.setdefault("n_layers", 3 if decoder == "mlseg" else 2)
  kw.setdefault("pool_grid", 16 if decoder in ("mlseg_trandec", "mlseg_pooling") else 8)
  kw.setdefault("num_classes", N_CLS)
  kw.setdefault("topk", TOPK)
  return tiny_model_config(decoder, **kw)


def _head(c):
  return decoders.DECODERS[c.decoder].build(c, jnp.float32)


def _forward_and_losses(head, c):
  def run(params, tokens, labels):
    out = head.apply(params, tokens, labels=labels)
    return out, losses.mlseg_losses(out, labels, c)
  return jax.jit(run)


def _batch(b=3, grid=(4, 4), crop=(64, 64), seed=0):
  """Tokens, and label crops with a different class mix (and some ignore) per image."""
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(b, *grid, 64)).astype(np.float32)
  mixes = [(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), (3,), (2, 5, 9, 11), ()]
  labels = np.stack([rng.choice(np.asarray(mixes[i % 4] or (-1,)), size=crop)
                     for i in range(b)]).astype(np.int32)
  labels[:, :8, :5] = IGNORE_LABEL
  return jnp.asarray(tokens), jnp.asarray(labels)


def _init(module, *args, seed=0, **kwargs):
  """Random variables shaped like `module.init(...)`'s, without compiling init."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ("scale", "gamma"):
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1:
      return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = np.prod(shape[:-1]) if name == "kernel" else shape[-1]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------
# Selection, targets and scattering on hand-made inputs.


def test_select_topk_classes_is_descending_and_ties_go_to_the_lower_id():
  logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 2.0, 0.5],
                      [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(mlseg.select_topk_classes(logits, 3), [[1, 3, 4], [0, 1, 2]])
  assert mlseg.select_topk_classes(logits, 3).dtype == jnp.int32
  with pytest.raises(ValueError, match="topk=7 exceeds the 6 classes"):
    mlseg.select_topk_classes(logits, 7)


def test_rank_labels_remap_selected_classes_and_ignore_the_rest():
  topk = jnp.array([[4, 1, 3], [0, 5, 2]])
  labels = jnp.array([[[4, 1, 0], [3, -1, 5]],
                      [[4, 1, 0], [3, -1, 5]]])
  np.testing.assert_array_equal(mlseg.rank_labels(labels, topk, 6),
                                [[[0, 1, -1], [2, -1, -1]],
                                 [[-1, -1, 0], [-1, -1, 1]]])
  bad = jnp.array([[[6, 255]], [[2, -7]]])  # Ids outside [0, n_cls) are never selected.
  np.testing.assert_array_equal(mlseg.rank_labels(bad, topk, 6), [[[-1, -1]], [[2, -1]]])


def test_class_histogram_counts_classes_and_never_the_ignore_label():
  labels = jnp.array([[[0, 0, -1], [5, -1, -1]],
                      [[-1, -1, -1], [-1, -1, -1]]])
  hist = mlseg.class_histogram(labels, 6)
  np.testing.assert_array_equal(hist, [[2, 0, 0, 0, 0, 1], [0] * 6])
  # The image loss's multi-hot target is built from it: BCE against [[1,0,0,0,0,1], 0s].
  c = _config(num_classes=6, img_loss_weight=2.0)
  x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(2, 6)
  out = {"image_logits": jnp.asarray(x), "topk_index": jnp.array([[0, 1, 2, 3, 4]] * 2),
         "rank_logits": jnp.zeros((2, 1, 1, 5))}
  target = np.array([[1, 0, 0, 0, 0, 1], [0] * 6], np.float32)
  bce = np.mean(np.log1p(np.exp(-x)) * target + np.log1p(np.exp(x)) * (1 - target))
  _, metrics = losses.mlseg_losses(out, labels, c)
  np.testing.assert_allclose(metrics["loss_img"], 2.0 * bce, rtol=1e-6)


def test_inference_logits_put_rank_slots_in_their_class_channels():
  rank_logits = jnp.arange(2 * 1 * 2 * 3, dtype=jnp.float32).reshape(2, 1, 2, 3)
  topk = jnp.array([[4, 0, 2], [1, 2, 3]])
  full = mlseg.scatter_to_classes(rank_logits, topk, 5)
  expected = np.full((2, 1, 2, 5), -100.0, np.float32)
  for b in range(2):
    for slot, cls in enumerate(np.asarray(topk[b])):
      expected[b, ..., cls] = np.asarray(rank_logits[b, ..., slot])
  np.testing.assert_array_equal(full, expected)


def test_asymmetric_loss_without_focusing_or_clip_is_bce():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.uniform(-5, 5, size=(3, 7)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, 2, size=(3, 7)).astype(np.float32))
  asl = losses.asymmetric_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
  bce = losses.binary_cross_entropy_with_logits(logits, targets)
  np.testing.assert_allclose(asl, bce, rtol=1e-6)  # Both: sum / B / n_cls = mean.
  # The clip only lowers the negatives' loss; focusing lowers it further.
  clipped = losses.asymmetric_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0)
  focused = losses.asymmetric_loss(logits, targets, gamma_neg=2.0, gamma_pos=0.0)
  assert focused < clipped < bce


def test_asymmetric_loss_gradients_are_finite_at_saturated_logits():
  logits = jnp.array([[40.0, -40.0, 0.0]])
  targets = jnp.array([[1.0, 0.0, 1.0]])
  for gammas in [(2.0, 0.0), (4.0, 1.0), (0.0, 0.0)]:
    g = jax.grad(lambda x: losses.asymmetric_loss(x, targets, gamma_neg=gammas[0],
                                                  gamma_pos=gammas[1]))(logits)
    assert np.isfinite(np.asarray(g)).all(), gammas


# ---------------------------------------------------------------------------------------
# Batches: B images give exactly what B single-image runs give.


# (The pooling head shares the selected-label path with these; its classifier is a mean
# and two 1x1 convs per image.)
@pytest.mark.parametrize("decoder,img_loss", [("mlseg", "bce"), ("mlseg_trandec", "asl"),
                                              ("mlseg_gt", "bce")])
def test_a_batch_equals_single_image_runs(decoder, img_loss):
  c = _config(decoder, img_loss=img_loss, gamma_neg=2.0)
  head = _head(c)
  run = _forward_and_losses(head, c)
  tokens, labels = _batch(4)
  params = _init(head, tokens, labels=labels)
  out, (loss, metrics) = run(params, tokens, labels)
  singles = [run(params, tokens[i:i + 1], labels[i:i + 1]) for i in range(4)]
  for key in out:
    np.testing.assert_allclose(out[key], np.concatenate([s[key] for s, _ in singles]),
                               rtol=1e-5, atol=1e-5, err_msg=key)
  if decoder != "mlseg_gt":  # The images must not all select the same classes.
    assert len({tuple(np.sort(s["topk_index"][0])) for s, _ in singles}) > 1
  np.testing.assert_allclose(loss, np.mean([l for _, (l, _) in singles]), rtol=1e-5)
  for name in metrics:
    np.testing.assert_allclose(metrics[name], np.mean([m[name] for _, (_, m) in singles]),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_selected_class_tokens_are_gathered_per_image():
  classes = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  index = jnp.array([[3, 0], [1, 3]])
  np.testing.assert_array_equal(mlseg.gather_class_tokens(classes, index),
                                np.stack([classes[0, [3, 0]], classes[1, [1, 3]]]))


# ---------------------------------------------------------------------------------------
# +GT.


def _recorded(module, name, *args, **kwargs):
  """module.apply(*args, **kwargs), jitted, and the first argument of the `name` module's
  call (returned from the jitted function, so no tracer leaks)."""
  def run(*args):
    seen = []

    def spy(next_fun, a, kw, context):
      if context.method_name == "__call__" and "/".join(context.module.scope.path) == name:
        seen.append(a[0])
      return next_fun(*a, **kw)

    with nn.intercept_methods(spy):
      out = module.apply(*args, **kwargs)
    return out, seen[0]
  return jax.jit(run)(*args)


def test_gt_head_with_the_top_k_set_computes_the_selected_label_path():
  """Static shapes (all n_cls tokens, the absent hidden from attention) == the gather of
  the selected tokens, when the oracle set is a selecting head's top-k set."""
  selecting = _head(_config("mlseg_pooling"))
  oracle = _head(_config("mlseg_gt"))
  tokens, labels = _batch(2)
  sel_params = _init(selecting, tokens)["params"]
  gt_params = dict(_init(oracle, tokens, labels=labels, seed=1)["params"])
  for name in ("proj_dec", "cls_emb", "blocks_0", "blocks_1", "decoder_norm", "proj_patch",
               "proj_classes"):
    gt_params[name] = sel_params[name]

  out, sel_masks = _recorded(selecting, "mask_norm", {"params": sel_params}, tokens)
  topk = out["topk_index"]
  assert not np.array_equal(np.sort(topk[0]), np.sort(topk[1]))
  label_set = np.zeros((2, N_CLS), bool)
  np.put_along_axis(label_set, np.asarray(topk), True, axis=1)

  gt_out, all_masks = _recorded(oracle, "mask_norm", {"params": gt_params}, tokens,
                                labels=jnp.asarray(label_set))
  np.testing.assert_array_equal(gt_out["label_set"], label_set)
  gt_masks = jnp.take_along_axis(all_masks, topk[:, None, :], axis=-1)  # Rank order.
  np.testing.assert_allclose(gt_masks, sel_masks, rtol=1e-5, atol=1e-6)
  outside = ~np.broadcast_to(label_set[:, None, None], (2, 4, 4, N_CLS))
  assert (np.asarray(gt_out["logits"])[outside] == -100).all()


def test_gt_label_set_comes_from_labels_of_any_size_or_a_ready_set():
  labels = jnp.array([[[1, 1, -1, 4]], [[-1, -1, -1, -1]]])
  expected = np.zeros((2, 6), bool)
  expected[0, [1, 4]] = True
  expected[1, 0] = True  # No labelled pixel: class 0 alone, as the reference.
  np.testing.assert_array_equal(mlseg_gt.oracle_label_set(labels, 6), expected)
  np.testing.assert_array_equal(mlseg_gt.oracle_label_set(jnp.asarray(expected), 6), expected)
  with pytest.raises(ValueError, match="n_cls=7"):
    mlseg_gt.oracle_label_set(jnp.asarray(expected), 7)
  head = _head(_config("mlseg_gt"))
  tokens, crop_labels = _batch(1)
  params = _init(head, tokens, labels=crop_labels)
  whole_image = jnp.full((1, 100, 150), 3, jnp.int32)  # Test time: the whole image's labels.
  out = jax.jit(head.apply)(params, tokens, labels=whole_image)
  assert out["label_set"][0].tolist() == [i == 3 for i in range(N_CLS)]
  assert (np.asarray(out["logits"])[..., np.arange(N_CLS) != 3] == -100).all()
  with pytest.raises(ValueError, match="needs `labels`"):
    jax.eval_shape(lambda: head.apply(params, tokens))


# ---------------------------------------------------------------------------------------
# OCE.


def test_oce_class_tokens_come_from_the_backbone_and_enter_block_0():
  c = _config("mlseg", oce=True, oce_start_layer=1, oce_init="trunc_normal")
  model = segmenter.build_model(c)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  params = _init(model, images)["params"]
  assert "cls_emb" not in params["decode_head"]
  assert params["backbone"]["cls_emb"].shape == (1, N_CLS, 64)
  assert params["backbone"]["pos_embedding"].shape == (1, 1 + 16, 64)  # No class entries.
  out, block0_in = _recorded(model, "decode_head/blocks_0", {"params": params}, images)
  backbone = jax.jit(model.backbone.apply)
  _, aux = backbone({"params": params["backbone"]}, images)
  assert aux["class_tokens"].shape == (2, N_CLS, 64)
  assert block0_in.shape == (2, 8 * 8 + N_CLS, 64)  # Pooled patches + class tokens.
  np.testing.assert_array_equal(block0_in[:, -N_CLS:], aux["class_tokens"])
  assert out["image_logits"].shape == (2, N_CLS) and out["logits"].shape == (2, 4, 4, N_CLS)

  # Without position embedding the class tokens are interchangeable: permuting their
  # initial values permutes the backbone's output tokens the same way.
  perm = np.random.default_rng(0).permutation(N_CLS)
  permuted = jax.tree_util.tree_map(lambda a: a, params["backbone"])
  permuted["cls_emb"] = params["backbone"]["cls_emb"][:, perm]
  _, aux_perm = backbone({"params": permuted}, images)
  np.testing.assert_allclose(aux_perm["class_tokens"], aux["class_tokens"][:, perm],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="d_model == backbone width"):
    jax.eval_shape(_head(_config("mlseg", d_model=32)).init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 4, 4, 64)), jnp.zeros((1, N_CLS, 64)))


# ---------------------------------------------------------------------------------------
# Gradients.


def test_gradients_follow_the_reference_paths():
  c = _config("mlseg", n_layers=2)
  head = _head(c)
  tokens, labels = _batch(2)
  params = _init(head, tokens)["params"]

  def parts(p):
    out = head.apply({"params": p}, tokens)
    metrics = losses.mlseg_losses(out, labels, c)[1]
    return jnp.stack([metrics["loss_seg"], metrics["loss_img"],
                      out["topk_index"].astype(jnp.float32).sum()])

  jacobian = jax.jit(jax.jacrev(parts))(params)  # Each leaf: (3, *shape).
  seg, img, index_grad = (jax.tree_util.tree_map(lambda a, i=i: a[i], jacobian)
                          for i in range(3))

  def norm(tree):
    return float(sum(jnp.abs(a).sum() for a in jax.tree_util.tree_leaves(tree)))

  # Block 0 runs on pooled tokens here: its only way to the seg loss is the gathered
  # class tokens (and decoder_norm2 on the way).
  assert norm(seg["blocks_0"]) > 0 and norm(seg["decoder_norm2"]) > 0
  assert norm(seg["cls_emb"]) > 0
  assert norm(seg["ml_fc"]) == 0.0  # The top-k indices carry no gradient.
  assert norm(img["ml_fc"]) > 0 and norm(img["blocks_0"]) > 0
  for name in ("blocks_1", "decoder_norm", "proj_patch", "proj_classes", "mask_norm"):
    assert norm(img[name]) == 0.0, name
  assert norm(index_grad) == 0.0


# ---------------------------------------------------------------------------------------
# Configs, converter tables, errors.


@pytest.mark.parametrize("decoder,oce", [("mlseg", False), ("mlseg", True),
                                         ("mlseg_trandec", False), ("mlseg_pooling", False),
                                         ("mlseg_gt", False), ("mlseg_gt", True)])
def test_rule_tables_name_every_head_parameter(decoder, oce):
  c = _config(decoder, oce=oce)
  head = _head(c)
  tokens, labels = _batch(1)
  class_emb = jnp.zeros((1, N_CLS, 64)) if oce else None
  shapes = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), tokens, class_emb,
                                            labels=labels))["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  rules = decoders.decoder_spec(c).reference_rules(c)
  state = convert.from_params({"decode_head": params}, rules)  # Raises if one is left.
  assert ("decode_head.cls_emb" in state) == (not oce)
  back = convert.to_params(state, rules, {"decode_head": shapes})
  assert jax.tree_util.tree_structure(back["decode_head"]) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(np.asarray, params))
  assert any(r.torch_key == "backbone.cls_emb"
             for r in checkpoint_rules.mmcv_vit_rules(2, with_cls_emb=True))


def test_bad_settings_fail_with_a_clear_message():
  tokens, labels = _batch(1)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="topk=13"):
    jax.eval_shape(_head(_config("mlseg", topk=13)).init, key, tokens)
  with pytest.raises(ValueError, match="pool_grid must be > 0"):
    jax.eval_shape(_head(_config("mlseg_pooling", pool_grid=0)).init, key, tokens)
  c = _config("mlseg", img_loss="focal")
  head = _head(c)

  def losses_of_a_fresh_head():
    return losses.mlseg_losses(head.apply(head.init(key, tokens), tokens), labels, c)
  with pytest.raises(ValueError, match="img_loss='focal'"):
    jax.eval_shape(losses_of_a_fresh_head)


@pytest.mark.parametrize("decoder", ["mlseg", "mlseg_trandec", "mlseg_pooling", "mlseg_gt"])
def test_bfloat16_heads_keep_float32_image_logits_and_losses(decoder):
  c = _config(decoder, dtype="bfloat16")
  head = decoders.DECODERS[decoder].build(c, jnp.bfloat16)
  tokens, labels = _batch(2)
  tokens = tokens.astype(jnp.bfloat16)
  params = _init(head, tokens, labels=labels)
  out, (loss, metrics) = jax.eval_shape(_forward_and_losses(head, c), params, tokens, labels)
  assert out["logits"].dtype == jnp.bfloat16 and out["logits"].shape == (2, 4, 4, N_CLS)
  if decoder != "mlseg_gt":
    assert out["image_logits"].dtype == jnp.float32
    assert out["rank_logits"].dtype == jnp.bfloat16
  assert loss.dtype == jnp.float32 and all(m.dtype == jnp.float32 for m in metrics.values())


def test_no_pool_grid_runs_block_0_on_every_patch_token():
  head = _head(_config("mlseg", pool_grid=0))
  tokens, _ = _batch(1, grid=(3, 5))
  out, block0_in = _recorded(head, "blocks_0", _init(head, tokens), tokens)
  assert block0_in.shape == (1, 15 + N_CLS, 64)
  assert out["rank_logits"].shape == (1, 3, 5, TOPK)


@pytest.mark.slow
def test_real_shapes_b16_coco_stuff_head():
  """COCO-Stuff's MLSeg head at its real shapes: 171 classes, k 50, 32x32 tokens, D 768."""
  c = tiny_model_config("mlseg", num_classes=171, topk=50, n_layers=3, d_model=768,
                        n_heads=12, d_ff=3072, pool_grid=8)
  head = _head(c)
  tokens = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 768))
  labels = jax.random.randint(jax.random.PRNGKey(1), (1, 512, 512), -1, 171)
  params = _init(head, tokens)

  @jax.jit
  def step(p):
    out = head.apply(p, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    return losses.mlseg_losses(out, labels, c), out

  (loss, metrics), out = step(params)
  assert out["rank_logits"].shape == (1, 32, 32, 50)
  assert out["logits"].shape == (1, 32, 32, 171)
  assert out["topk_index"].shape == (1, 50)
  assert np.isfinite(float(loss))
  assert 0 < float(metrics["image_recall"]) <= 1
  # Random labels cover every class: 50 of 171 selected, the pixel recall is about 50/171.
  np.testing.assert_allclose(metrics["image_accuracy"], 1.0)
  assert abs(float(metrics["pixel_recall"]) - 50 / 171) < 0.02
