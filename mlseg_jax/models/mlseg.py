"""MLSeg (RankSeg): multi-label classification selects the classes each image's pixels
are classified among (REFERENCE.md §3-4).

A multi-label head scores all n_cls classes for the image; the k best (no threshold, the
same rule at training and test) are the image's label set. Their class tokens, in rank
order, join the patch tokens in the segmentation blocks, and every pixel is classified
among those k rank slots only. At inference the k mask logits go back to their class
channels and every other class gets -100.

The heads, by the name `model.decoder` gives them in `decoders.py` (the reference's class
in brackets):
  "mlseg"          MLSegHead [MaskTransformerRankSegHead]: "1 TranEnc Layer". Block 0 runs
                   the class tokens with the 8x8-pooled patch tokens (or with all patch
                   tokens when `downsample` is 0); decoder_norm2 + GroupWiseLinear score
                   the classes; blocks 1.. segment with the selected block-0 class tokens.
  "mlseg_trandec"  MLSegAblationHead [MaskTransformerRankSegDecoderHead + RankSegDecoderHead]:
                   "2 TranDec Layers", a Query2Label decoder over the 16x16-pooled map.
  "mlseg_pooling"  MLSegAblationHead [... + RankSegGlobalPoolingHead]: "Global Pooling".
                   Both ablations select among the raw class embeddings and segment with
                   all `n_layers` blocks.
  "mlseg_gt"       MLSegOracleHead [MaskTransformerRankSegGTHead]: "+GT", the label set
                   is the ground truth's (needs `labels`, also at test).

Every head returns "logits" (B, gh, gw, n_cls), -100 outside the selected classes. The
selecting heads add "image_logits" (B, n_cls), "topk_index" (B, k) int32 best first, and
"rank_logits" (B, gh, gw, k), the masks over the k rank slots that the loss reads; the
+GT head adds "label_set" (B, n_cls) bool.

Where we differ from the reference, on purpose:
- The class-token gather is batched (the reference's `view(n_cls, -1)[topk_index]` is only
  right for one image per device).
- Exact ties in the image logits go to the lower class id (`lax.top_k`); torch.argsort
  (descending, unstable) may order them either way.
- +GT is written with static shapes: all n_cls class tokens run through the blocks, the
  ones outside the oracle set hidden from attention, so one compiled step serves every k.
- The heads all accept OCE class tokens; the reference wires OCE only into the MLSeg head.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.models.mask_transformer import cosine_masks, decoder_blocks, projection_init
from mlseg_jax.models.vit import trunc_normal

Dtype = Any

# Inference logit of a class outside the selected set (the reference's fill value).
UNSELECTED_LOGIT = -100.0

# The reference's Query2Label decoder ("2 TranDec Layers"): RankSegDecoderHead's defaults.
TRANDEC_HEADS = 8
TRANDEC_FFN = 2048
TRANDEC_DROPOUT = 0.1
TRANDEC_LAYERS = 2


# ---------------------------------------------------------------------------------------
# Pieces shared by the heads.


def _pool_axis(x, axis: int, out: int):
  n = x.shape[axis]
  if n % out == 0:
    shape = x.shape[:axis] + (out, n // out) + x.shape[axis + 1:]
    return x.reshape(shape).mean(axis + 1)
  # PyTorch's bins: [floor(i n / o), ceil((i + 1) n / o)); they overlap when o does not
  # divide n, and repeat rows when o > n.
  bins = [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]
  return jnp.stack([jax.lax.slice_in_dim(x, s, e, axis=axis).mean(axis) for s, e in bins],
                   axis)


def adaptive_avg_pool(x, size):
  """PyTorch's AdaptiveAvgPool2d on a channels-last map: (B, H, W, C) -> (B, *size, C).

  Any input grid: a 30x30 (480 crops) or 4x4 grid pools to 8x8 exactly as torch does.
  """
  x32 = x.astype(jnp.float32)
  h, w = x.shape[1:3]
  if h % size[0] == 0 and w % size[1] == 0:  # Equal blocks: one 2-D mean, as torch sums.
    b, c = x.shape[0], x.shape[3]
    x32 = x32.reshape(b, size[0], h // size[0], size[1], w // size[1], c).mean((2, 4))
  else:
    x32 = _pool_axis(_pool_axis(x32, 1, size[0]), 2, size[1])
  return x32.astype(x.dtype)


def _torch_uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class GroupWiseLinear(nn.Module):
  """One linear classifier per class token: logit_c = sum_d W[c, d] t[c, d] + b[c].

  Parameters keep the reference's (1, n_cls, D) / (1, n_cls) shapes (`ml_fc.W`, `ml_fc.b`).
  Always float32: these logits decide the selection, and the cost is B x n_cls x D.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x):  # (B, n_cls, D) -> (B, n_cls)
    d = x.shape[-1]
    init = _torch_uniform(1.0 / math.sqrt(d))
    w = self.param("W", init, (1, self.num_classes, d))
    b = self.param("b", init, (1, self.num_classes))
    # Elementwise, not a matmul: no reduced-precision dot on accelerators.
    return (w * x.astype(jnp.float32)).sum(-1) + b


def select_topk_classes(image_logits, k: int):
  """The image's label set: indices of the k highest image logits, best first.

  (B, n_cls) -> (B, k) int32. Indices carry no gradient. Exact ties go to the lower class
  id; the reference's unstable torch.argsort may put either first.
  """
  if k > image_logits.shape[-1]:
    raise ValueError(f"topk={k} exceeds the {image_logits.shape[-1]} classes")
  _, index = jax.lax.top_k(jax.lax.stop_gradient(image_logits).astype(jnp.float32), k)
  return index.astype(jnp.int32)


def gather_class_tokens(class_tokens, index):
  """(B, n_cls, D) tokens, (B, k) class ids -> (B, k, D), in the order of `index`."""
  return jnp.take_along_axis(class_tokens, index[:, :, None], axis=1)


def rank_of_class(topk_index, num_classes: int):
  """(B, k) selected ids -> (B, n_cls) int32: each class's rank slot, -1 if unselected."""
  b, k = topk_index.shape
  slots = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
  return jnp.full((b, num_classes), -1, jnp.int32).at[
      jnp.arange(b)[:, None], topk_index].set(slots)


def scatter_to_classes(rank_logits, topk_index, num_classes: int):
  """Inference logits: (B, gh, gw, k) rank-slot masks -> (B, gh, gw, n_cls), -100 elsewhere.

  A gather along the channel axis from each class's slot: exact, no transposes.
  """
  slot = rank_of_class(topk_index, num_classes)[:, None, None, :]  # (B, 1, 1, n_cls)
  picked = jnp.take_along_axis(
      rank_logits, jnp.broadcast_to(jnp.maximum(slot, 0),
                                    rank_logits.shape[:3] + (num_classes,)), axis=-1)
  return jnp.where(slot >= 0, picked, jnp.asarray(UNSELECTED_LOGIT, rank_logits.dtype))


def class_histogram(labels, num_classes: int):
  """(B, H, W) labels -> (B, n_cls) int32 pixel count per class; ignore (and any id
  outside [0, n_cls), as torch.histc drops them) is not counted."""
  flat = labels.reshape(labels.shape[0], -1)
  flat = jnp.where((flat >= 0) & (flat < num_classes), flat, num_classes)
  count = lambda row: jnp.zeros(num_classes + 1, jnp.int32).at[row].add(1)[:num_classes]
  return jax.vmap(count)(flat)


def lookup_classes(table, labels, num_classes: int, missing):
  """table[b, labels[b, h, w]] for (B, n_cls) tables; ignore and ids outside [0, n_cls)
  give `missing`."""
  flat = labels.reshape(labels.shape[0], -1)
  valid = (flat >= 0) & (flat < num_classes)
  value = jnp.take_along_axis(table, jnp.where(valid, flat, 0), axis=1)
  return jnp.where(valid, value, missing).reshape(labels.shape)


def rank_labels(labels, topk_index, num_classes: int):
  """Segmentation targets over the k rank slots: (B, H, W) class ids -> (B, H, W) slots.

  Pixels of unselected classes, and ignore pixels, become ignore.
  """
  slot = lookup_classes(rank_of_class(topk_index, num_classes), labels, num_classes, -1)
  return jnp.where(slot >= 0, slot, IGNORE_LABEL)


def _class_embeddings(module, class_emb, batch: int, num_classes: int, d_model: int):
  """The head's own `cls_emb`, or OCE's class tokens from the backbone (then no param)."""
  if class_emb is None:
    cls_emb = module.param("cls_emb", trunc_normal(), (1, num_classes, d_model))
    return jnp.broadcast_to(cls_emb, (batch, num_classes, d_model))
  if class_emb.shape[1:] != (num_classes, d_model):
    raise ValueError(f"OCE class tokens {class_emb.shape} do not match n_cls={num_classes}, "
                     f"d_model={d_model} (OCE needs d_model == backbone width)")
  return class_emb


def _segment(module, patches, classes, blocks, *, train: bool, kv_seqlen=None):
  """Segmentation blocks + decoder_norm + cosine masks, before mask_norm.

  patches (B, N, D), classes (B, K, D) -> (B, N, K). kv_seqlen (B,): tokens at or past
  it are hidden from attention as keys.
  """
  k = classes.shape[1]
  x = jnp.concatenate([patches, classes.astype(patches.dtype)], 1)
  for blk in blocks:
    x = blk(x, train, kv_seqlen)
  x = nn.LayerNorm(epsilon=1e-5, dtype=module.dtype, name="decoder_norm")(x)
  d = module.d_model
  proj_patch = module.param("proj_patch", projection_init(d), (d, d))
  proj_classes = module.param("proj_classes", projection_init(d), (d, d))
  return cosine_masks(x[:, :-k], x[:, -k:], proj_patch, proj_classes)


def _selected_label_outputs(module, patches, classes, image_logits, blocks, grid, *, train):
  """Top-k selection, the rank-slot masks and the full-class logits of a selecting head."""
  b = patches.shape[0]
  topk_index = select_topk_classes(image_logits, module.topk)  # (B, k)
  selected = gather_class_tokens(classes, topk_index)  # (B, k, D), rank order
  masks = _segment(module, patches, selected, blocks, train=train)  # (B, N, k)
  # mask_norm normalises over the k rank slots: its scale/bias are per slot, not per class.
  masks = nn.LayerNorm(epsilon=1e-5, dtype=module.dtype, use_fast_variance=False,
                       name="mask_norm")(masks)
  rank_logits = masks.reshape(b, *grid, module.topk)
  return {
      "image_logits": image_logits.astype(jnp.float32),
      "topk_index": topk_index,
      "rank_logits": rank_logits,
      "logits": scatter_to_classes(rank_logits, topk_index, module.num_classes),
  }


def _check_topk(topk, num_classes):
  if not 0 < topk <= num_classes:
    raise ValueError(f"model.topk={topk} must be in [1, num_classes={num_classes}]")


# ---------------------------------------------------------------------------------------
# MLSeg: the "1 TranEnc Layer" multi-label head.


class MLSegHead(nn.Module):
  """MLSeg's decoder: block 0 is the multi-label branch, blocks 1.. segment the top-k.

  (B, gh, gw, D_enc) tokens [, (B, n_cls, D) OCE class tokens] -> dict (module docstring).
  """
  num_classes: int
  topk: int = 50
  downsample: int = 8  # Pooled grid of the multi-label branch; 0: all patch tokens.
  d_model: int = 768
  n_layers: int = 3  # Block 0 + (n_layers - 1) segmentation blocks.
  n_heads: int = 12
  d_ff: int = 3072
  dropout: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    del labels  # The label set comes from the multi-label head.
    _check_topk(self.topk, self.num_classes)
    if self.n_layers < 1:
      raise ValueError(f"model.n_layers={self.n_layers}: MLSeg needs block 0 at least")
    b, gh, gw, _ = tokens.shape
    n_cls = self.num_classes
    proj_dec = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                        name="proj_dec")
    patches = proj_dec(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    classes = _class_embeddings(self, class_emb, b, n_cls, self.d_model)  # (B, n_cls, D)
    blocks = decoder_blocks(self.n_layers, self.n_heads, self.d_ff, self.dropout,
                            self.drop_path_rate, self.dtype, self.attention_impl)

    # Multi-label branch: every class token attends to a coarse view of the image.
    if self.downsample:
      pooled = adaptive_avg_pool(tokens, (self.downsample, self.downsample))
      ml_patches = proj_dec(pooled.reshape(b, self.downsample ** 2, -1))  # (B, s*s, D)
    else:
      ml_patches = patches
    x = blocks[0](jnp.concatenate([ml_patches, classes.astype(ml_patches.dtype)], 1), train)
    if not self.downsample:  # Block 0's patch outputs feed the segmentation blocks.
      patches = x[:, :-n_cls]
    classes = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm2")(
        x[:, -n_cls:])  # (B, n_cls, D)
    image_logits = GroupWiseLinear(n_cls, name="ml_fc")(classes)  # (B, n_cls)

    # The selected block-0 class tokens (not the raw embeddings) segment the image.
    return _selected_label_outputs(self, patches, classes, image_logits, blocks[1:],
                                   (gh, gw), train=train)


# ---------------------------------------------------------------------------------------
# Head ablations: "2 TranDec Layers" and "Global Pooling".


def sine_position_embedding(h: int, w: int, dim: int) -> np.ndarray:
  """DETR's normalised sine embedding of an (h, w) grid -> (h * w, dim), float32.

  [y features; x features], each dim/2 wide with sin/cos interleaved, computed in float32
  step by step as the reference's PositionEmbeddingSine(normalize=True) does.
  """
  f32 = np.float32
  n = dim // 2
  y = np.broadcast_to(np.arange(1, h + 1, dtype=f32)[:, None], (h, w))
  x = np.broadcast_to(np.arange(1, w + 1, dtype=f32)[None, :], (h, w))
  scale = f32(2 * math.pi)
  y = y / (f32(h) + f32(1e-6)) * scale
  x = x / (f32(w) + f32(1e-6)) * scale
  dim_t = f32(10000) ** (f32(2) * (np.arange(n, dtype=f32) // f32(2)) / f32(n))

  def features(pos):
    pos = pos[..., None] / dim_t  # (h, w, n)
    return np.stack([np.sin(pos[..., 0::2]), np.cos(pos[..., 1::2])], -1).reshape(h, w, n)

  return np.concatenate([features(y), features(x)], -1).reshape(h * w, dim).astype(f32)


class CrossAttention(nn.Module):
  """torch.nn.MultiheadAttention's math (packed in_proj, q scaled by head_dim**-0.5)."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, *, train: bool):
    d = query.shape[-1]
    h = self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by {h} heads")
    w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
    w, bias = w.astype(self.dtype), bias.astype(self.dtype)
    split = lambda t, i: (t @ w[:, i * d:(i + 1) * d] + bias[i * d:(i + 1) * d]).reshape(
        t.shape[0], t.shape[1], h, d // h)
    q = split(query, 0) * (d // h) ** -0.5  # (B, Q, H, Dh)
    k, v = split(key, 1), split(value, 2)  # (B, S, H, Dh)
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    y = jnp.einsum("bhqs,bshd->bqhd", probs, v).reshape(query.shape[0], query.shape[1], d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="out_proj")(y)


class TranDecLayer(nn.Module):
  """Query2Label decoder layer without self-attention: post-norm cross-attention + ReLU FFN."""
  num_heads: int = TRANDEC_HEADS
  d_ff: int = TRANDEC_FFN
  dropout: float = TRANDEC_DROPOUT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt, memory, pos, query_pos, *, train: bool):
    d = tgt.shape[-1]
    drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)
    y = CrossAttention(self.num_heads, self.dropout, self.dtype, name="multihead_attn")(
        tgt + query_pos, memory + pos, memory, train=train)
    tgt = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(tgt + drop(y))
    y = nn.Dense(self.d_ff, dtype=self.dtype, kernel_init=trunc_normal(), name="linear1")(tgt)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="linear2")(
        drop(nn.relu(y)))
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm3")(tgt + drop(y))


class TranDecClassifier(nn.Module):
  """"2 TranDec Layers": Query2Label over the pooled map, class embeddings as queries.

  Queries start at zero with the class embeddings as their position; keys carry a fixed
  sine position embedding. (B, s, s, C_enc) map, (B, n_cls, D) embeddings -> (B, n_cls).
  """
  num_classes: int
  num_layers: int = TRANDEC_LAYERS
  num_heads: int = TRANDEC_HEADS
  d_ff: int = TRANDEC_FFN
  dropout: float = TRANDEC_DROPOUT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled, class_emb, *, train: bool):
    b, sh, sw, c_in = pooled.shape
    d = class_emb.shape[-1]
    memory = nn.Conv(d, (1, 1), dtype=self.dtype,
                     kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     bias_init=_torch_uniform(1 / math.sqrt(c_in)), name="input_proj")(pooled)
    memory = memory.reshape(b, sh * sw, d)  # (B, S, D)
    pos = jnp.asarray(sine_position_embedding(sh, sw, d), self.dtype)[None]  # (1, S, D)
    query_pos = class_emb.astype(self.dtype)  # (B, n_cls, D)
    tgt = jnp.zeros_like(query_pos)
    for i in range(self.num_layers):
      tgt = TranDecLayer(self.num_heads, self.d_ff, self.dropout, self.dtype,
                         name=f"layers_{i}")(tgt, memory, pos, query_pos, train=train)
    tgt = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(tgt)
    return GroupWiseLinear(self.num_classes, name="fc")(tgt)


class GlobalPoolingClassifier(nn.Module):
  """"Global Pooling": mean over the pooled map, 1x1 conv + ReLU, 1x1 conv to n_cls."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):  # (B, s, s, C_enc) -> (B, n_cls)
    c = pooled.shape[-1]
    x = pooled.astype(jnp.float32).mean((1, 2), keepdims=True).astype(self.dtype)
    # mmcv ConvModule's init (kaiming normal, fan_out, ReLU); then torch's Conv2d default.
    x = nn.relu(nn.Conv(c, (1, 1), dtype=self.dtype,
                        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        name="conv")(x))
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_uniform(1 / math.sqrt(c)), name="cls_conv")(x)
    return x.reshape(x.shape[0], self.num_classes)


class MLSegAblationHead(nn.Module):
  """The head ablations: a separate multi-label classifier on the pooled encoder map
  selects among the raw class embeddings; all `n_layers` blocks segment."""
  num_classes: int
  classifier: str = "trandec"  # "trandec" ("2 TranDec Layers") or "pooling".
  topk: int = 50
  downsample: int = 16
  d_model: int = 768
  n_layers: int = 2
  n_heads: int = 12
  d_ff: int = 3072
  dropout: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    del labels
    _check_topk(self.topk, self.num_classes)
    if self.downsample <= 0:
      raise ValueError("the ablation heads classify a pooled map: model.downsample must be "
                       f"> 0 (the reference uses 16), got {self.downsample}")
    b, gh, gw, _ = tokens.shape
    classes = _class_embeddings(self, class_emb, b, self.num_classes, self.d_model)
    pooled = adaptive_avg_pool(tokens, (self.downsample, self.downsample))  # Encoder width.
    if self.classifier == "trandec":
      image_logits = TranDecClassifier(self.num_classes, dtype=self.dtype,
                                       name="img_cls_head")(pooled, classes, train=train)
    elif self.classifier == "pooling":
      image_logits = GlobalPoolingClassifier(self.num_classes, self.dtype,
                                             name="img_cls_head")(pooled)
    else:
      raise ValueError(f"classifier={self.classifier!r} is not 'trandec' or 'pooling'")
    patches = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    blocks = decoder_blocks(self.n_layers, self.n_heads, self.d_ff, self.dropout,
                            self.drop_path_rate, self.dtype, self.attention_impl)
    return _selected_label_outputs(self, patches, classes, image_logits, blocks, (gh, gw),
                                   train=train)


# ---------------------------------------------------------------------------------------
# +GT: the oracle label set.


def oracle_label_set(labels, num_classes: int):
  """The +GT label set: (B, H, W) labels (any size: the crop at training, the whole image
  at test) or a ready (B, n_cls) bool set -> (B, n_cls) bool. An image with no labelled
  pixel gets class 0 alone, as in the reference."""
  if labels.ndim == 2 and labels.dtype == jnp.bool_:
    if labels.shape[1] != num_classes:
      raise ValueError(f"label set {labels.shape} does not have n_cls={num_classes} columns")
    present = labels
  elif labels.ndim == 3:
    present = class_histogram(labels, num_classes) > 0
  else:
    raise ValueError(f"+GT labels must be (B, H, W) ids or a (B, n_cls) bool set, got "
                     f"{labels.shape} {labels.dtype}")
  empty = ~present.any(-1, keepdims=True)
  return present | (empty & (jnp.arange(num_classes) == 0))


class SelectedLayerNorm(nn.Module):
  """+GT's mask_norm: normalises over the present classes only, with an unbiased variance;
  the present classes, in class-id order, use the first k of n_cls gamma/beta slots.

  With one class the reference skips the division: the output is beta[0].
  """
  num_classes: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, label_set):  # (B, N, n_cls), (B, n_cls) bool -> (B, N, n_cls)
    gamma = self.param("gamma", nn.initializers.ones, (self.num_classes,))
    beta = self.param("beta", nn.initializers.zeros, (self.num_classes,))
    x = x.astype(jnp.float32)
    present = label_set[:, None, :]  # (B, 1, n_cls)
    k = label_set.sum(-1)[:, None, None].astype(jnp.float32)  # (B, 1, 1)
    slot = jnp.maximum(jnp.cumsum(label_set, -1) - 1, 0)[:, None, :]  # (B, 1, n_cls)
    mean = jnp.where(present, x, 0.0).sum(-1, keepdims=True) / k
    dev = jnp.where(present, x - mean, 0.0)
    var = (dev * dev).sum(-1, keepdims=True) / jnp.maximum(k - 1, 1)
    normed = jnp.where(k > 1, dev / jnp.sqrt(var + self.eps), dev)
    return jnp.take(gamma, slot) * normed + jnp.take(beta, slot)


class MLSegOracleHead(nn.Module):
  """"+GT": the label set is the ground truth's, k varies per image.

  Static shapes: the masks cover all n_cls classes; class tokens outside the set are
  hidden from attention (as keys, by a key length after the present ones), so the present
  ones compute what the reference's gather of the present tokens computes, and the absent
  ones are overwritten with -100.
  """
  num_classes: int
  d_model: int = 768
  n_layers: int = 2
  n_heads: int = 12
  d_ff: int = 3072
  dropout: float = 0.1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None):
    if labels is None:
      raise ValueError("the +GT head (model.decoder='mlseg_gt') needs `labels`: the crop's "
                       "at training, the whole image's at test")
    b, gh, gw, _ = tokens.shape
    n_cls = self.num_classes
    label_set = oracle_label_set(labels, n_cls)  # (B, n_cls)
    patches = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="proj_dec")(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    classes = _class_embeddings(self, class_emb, b, n_cls, self.d_model)
    # The present classes go first (stable: in class-id order), so one key length per
    # image hides the absent ones; the masks then go back to class order.
    order = jnp.argsort(~label_set, axis=-1, stable=True)  # (B, n_cls)
    classes = jnp.take_along_axis(classes, order[:, :, None], axis=1)
    kv_seqlen = (gh * gw + label_set.sum(-1)).astype(jnp.int32)
    blocks = decoder_blocks(self.n_layers, self.n_heads, self.d_ff, self.dropout,
                            self.drop_path_rate, self.dtype, self.attention_impl)
    masks = _segment(self, patches, classes, blocks, train=train,
                     kv_seqlen=kv_seqlen)  # (B, N, n_cls), present classes first
    masks = jnp.take_along_axis(masks, jnp.argsort(order, axis=-1)[:, None, :], axis=2)
    masks = SelectedLayerNorm(n_cls, name="mask_norm")(masks, label_set)
    logits = jnp.where(label_set[:, None, :], masks, UNSELECTED_LOGIT).astype(self.dtype)
    return {"logits": logits.reshape(b, gh, gw, n_cls), "label_set": label_set}
