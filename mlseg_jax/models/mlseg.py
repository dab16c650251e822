"""MLSeg (RankSeg): multi-label classification selects the classes each image's pixels
are classified among (REFERENCE.md §3-4).

A multi-label head scores all n_cls classes for the image; the k best (no threshold, the
same rule at training and test) are the image's label set. Their class tokens, in rank
order, join the patch tokens in the segmentation blocks, and every pixel is classified
among those k rank slots only. At inference the k mask logits go back to their class
channels and every other class gets -100.

This module holds the selection (top-k, the gather of the selected class tokens, rank
slots and their targets, the scatter back to the classes), the pieces the heads share
and the paper's head. The heads, by the name `model.decoder` gives them in
`decoders.py` (the reference's class in brackets):
  "mlseg"          MLSegHead [MaskTransformerRankSegHead], here: "1 TranEnc Layer".
                   Block 0 runs the class tokens with the 8x8-pooled patch tokens (or
                   with all patch tokens when `pool_grid` is 0); decoder_norm2 +
                   GroupWiseLinear score the classes; blocks 1.. segment with the
                   selected block-0 class tokens.
  "mlseg_trandec"  MLSegAblationHead [MaskTransformerRankSegDecoderHead + RankSegDecoderHead],
                   `mlseg_ablations.py`: "2 TranDec Layers", a Query2Label decoder over
                   the 16x16-pooled map.
  "mlseg_pooling"  MLSegAblationHead [... + RankSegGlobalPoolingHead], `mlseg_ablations.py`:
                   "Global Pooling".
  "mlseg_gt"       MLSegOracleHead [MaskTransformerRankSegGTHead], `mlseg_gt.py`: "+GT",
                   the label set is the ground truth's (needs `labels`, also at test).
All of them are `MaskTransformerBase`s (`mask_transformer.py`): its fields, blocks, class
tokens and segmentation tail.

Every head returns "logits" (B, gh, gw, n_cls), -100 outside the selected classes. The
selecting heads add "image_logits" (B, n_cls), "topk_index" (B, k) int32 best first, and
"rank_logits" (B, gh, gw, k), the masks over the k rank slots that the loss reads; the
+GT head adds "label_set" (B, n_cls) bool.

Where we differ from the reference, on purpose:
- The class-token gather is batched (the reference's `view(n_cls, -1)[topk_index]` is only
  right for one image per device).
- Exact ties in the image logits go to the lower class id (`lax.top_k`); torch.argsort
  (descending, unstable) may order them either way.
- +GT is written with static shapes (`mlseg_gt.py`).
- The heads all accept OCE class tokens; the reference wires OCE only into the MLSeg head.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.models.mask_transformer import MaskTransformerBase
from mlseg_jax.models.vit import grid_mask, trunc_normal

# Inference logit of a class outside the selected set (the reference's fill value).
UNSELECTED_LOGIT = -100.0


# ---------------------------------------------------------------------------------------
# Selection, rank slots and the pieces the selecting heads share.


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


def _pool_matrices(out: int, in_len: int) -> np.ndarray:
  """(in_len + 1, out, in_len): entry n averages PyTorch's adaptive bins over n inputs."""
  table = np.zeros((in_len + 1, out, in_len), np.float32)
  for n in range(1, in_len + 1):
    for i in range(out):
      s, e = i * n // out, -(-(i + 1) * n // out)
      table[n, i, s:e] = 1.0 / (e - s)
  return table


def adaptive_avg_pool_to(x, valid_grid, size):
  """`adaptive_avg_pool` of each map's own (gh, gw) top-left cells (valid_grid (B, 2)
  int32; a padded window's), one program for every grid."""
  (h, w), hp = x.shape[1:3], jax.lax.Precision.HIGHEST
  ph = jnp.asarray(_pool_matrices(size[0], h))[valid_grid[:, 0]]  # (B, s, H)
  pw = jnp.asarray(_pool_matrices(size[1], w))[valid_grid[:, 1]]  # (B, s, W)
  y = jnp.einsum("bih,bhwc->biwc", ph, x.astype(jnp.float32), precision=hp)
  return jnp.einsum("bjw,biwc->bijc", pw, y, precision=hp).astype(x.dtype)


def torch_uniform(bound):
  """U(-bound, bound): PyTorch's default init of Linear/Conv biases (and GroupWiseLinear)."""
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
    init = torch_uniform(1.0 / math.sqrt(d))
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


def segment_topk_classes(module, patches, classes, image_logits, blocks, grid, *, train,
                         patch_mask=None):
  """A selecting head's outputs (module docstring): top-k selection, the rank-slot masks
  and the full-class logits.

  module: the head (its `topk`, its scope for `mask_norm` and the segmentation tail);
  patches (B, N, D), classes (B, n_cls, D), image_logits (B, n_cls), grid (gh, gw).
  """
  b = patches.shape[0]
  topk_index = select_topk_classes(image_logits, module.topk)  # (B, k)
  selected = gather_class_tokens(classes, topk_index)  # (B, k, D), rank order
  masks = module.class_masks(patches, selected, blocks, train=train,
                             patch_mask=patch_mask)  # (B, N, k)
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


def check_topk(topk, num_classes):
  """The selecting heads' check of `model.topk`, before anything is built."""
  if not 0 < topk <= num_classes:
    raise ValueError(f"model.topk={topk} must be in [1, num_classes={num_classes}]")


# ---------------------------------------------------------------------------------------
# MLSeg: the "1 TranEnc Layer" multi-label head.


class MLSegHead(MaskTransformerBase):
  """MLSeg's decoder: block 0 is the multi-label branch, blocks 1.. segment the top-k.

  (B, gh, gw, D_enc) tokens [, (B, n_cls, D) OCE class tokens] -> dict (module docstring).
  """
  n_layers: int = 3  # Block 0 + (n_layers - 1) segmentation blocks.
  topk: int = 50
  pool_grid: int = 8  # Pooled grid of the multi-label branch; 0: all patch tokens.

  @nn.compact
  def __call__(self, tokens, class_emb=None, *, train: bool = False, labels=None,
               valid_grid=None):
    del labels  # The label set comes from the multi-label head.
    check_topk(self.topk, self.num_classes)
    if self.n_layers < 1:
      raise ValueError(f"model.n_layers={self.n_layers}: MLSeg needs block 0 at least")
    b, gh, gw, _ = tokens.shape
    n_cls = self.num_classes
    proj_dec = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=trunc_normal(),
                        name="proj_dec")
    patches = proj_dec(tokens.reshape(b, gh * gw, -1))  # (B, N, D)
    classes = self.class_embeddings(class_emb, b)  # (B, n_cls, D)
    blocks = self.decoder_blocks()

    # Multi-label branch: every class token attends to a coarse view of the image.
    patch_mask = None if valid_grid is None else grid_mask(valid_grid, (gh, gw))
    block0_mask = None
    if self.pool_grid:
      size = (self.pool_grid, self.pool_grid)
      pooled = (adaptive_avg_pool(tokens, size) if valid_grid is None
                else adaptive_avg_pool_to(tokens, valid_grid, size))
      ml_patches = proj_dec(pooled.reshape(b, self.pool_grid ** 2, -1))  # (B, s*s, D)
    else:
      ml_patches = patches
      if patch_mask is not None:
        block0_mask = jnp.concatenate([patch_mask, jnp.ones((b, n_cls), bool)], 1)
    x = blocks[0](jnp.concatenate([ml_patches, classes.astype(ml_patches.dtype)], 1), train,
                  None, block0_mask)
    if not self.pool_grid:  # Block 0's patch outputs feed the segmentation blocks.
      patches = x[:, :-n_cls]
    classes = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm2")(
        x[:, -n_cls:])  # (B, n_cls, D)
    image_logits = GroupWiseLinear(n_cls, name="ml_fc")(classes)  # (B, n_cls)

    # The selected block-0 class tokens (not the raw embeddings) segment the image.
    return segment_topk_classes(self, patches, classes, image_logits, blocks[1:], (gh, gw),
                                train=train, patch_mask=patch_mask)
