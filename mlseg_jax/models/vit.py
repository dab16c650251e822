"""Vision Transformer backbone, as the Segmenter configs of the reference use it.

REFERENCE.md §1: pre-norm blocks, exact (erf) GELU, LayerNorm eps 1e-6, qkv with bias, a
[CLS] token, a learned position embedding over [CLS; patches], linearly spaced stochastic
depth, a final LayerNorm, and input padded (bottom/right, zeros) to a multiple of the patch.

Parameter names follow timm's (`blocks_N/norm1`, `attn/qkv`, `mlp/fc1`, ...), so the
converters in `mlseg_jax/convert.py` are short tables.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mlseg_jax.resize import cubic_matrices, resize_bicubic

VARIANTS = {
    # name: (width, depth, heads, patch)
    "Ti/16": (192, 12, 3, 16),
    "S/16": (384, 12, 6, 16),
    "B/16": (768, 12, 12, 16),
    "L/16": (1024, 24, 16, 16),
    "B/8": (768, 12, 12, 8),
    "Ti/8": (192, 12, 3, 8),  # The quickstart's (4 layers of it): no pretrained weights exist.
}

Dtype = Any


def trunc_normal(stddev=0.02):
  # PyTorch's trunc_normal_ cuts at +-2 (absolute), which is +-100 std at std 0.02: in
  # effect a plain normal. flax's truncated_normal cuts at +-2 std; the difference only
  # matters for training from scratch and is documented in docs/differences.md.
  return nn.initializers.truncated_normal(stddev)


def keep_mask(rng, rate: float, shape) -> jax.Array:
  """Dropout's keep mask: True with probability 1 - rate (to 1/65536).

  Each 32 random bits make two decisions of 16 bits, halving the random numbers a mask
  costs: threefry, jax's generator, is most of the price of the decoder's attention
  dropout on a CPU (a (B, 12, 1074, 1074) mask per layer at 512). The scale applied to the
  kept values stays 1 / (1 - rate), as in PyTorch; at rate 0.1 the keep probability is
  58982 / 65536, 6e-6 below 0.9.
  """
  n = shape[-1]
  bits = jax.random.bits(rng, tuple(shape[:-1]) + ((n + 1) // 2,), jnp.uint32)
  halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :n]
  return halves < jnp.uint32(round((1.0 - rate) * 65536))


class Dropout(nn.Module):
  """Dropout with `keep_mask` (flax's nn.Dropout draws 32 bits per element)."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng("dropout"), self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _key_mask(kv_seqlen, kv_mask, n: int):
  """(B, 1, 1, N) keys that get attention, from a length and/or a boolean mask; None if
  neither is given."""
  valid = None
  if kv_seqlen is not None:
    valid = jnp.arange(n)[None, :] < kv_seqlen[:, None]
  if kv_mask is not None:
    valid = kv_mask if valid is None else valid & kv_mask
  return None if valid is None else valid[:, None, None, :]


_KEEP_MASK = jax.checkpoint_policies.save_only_these_names("attention_keep")


def _dropout_attention(q, k, v, kv_seqlen, kv_mask, rng, *, rate: float, dtype):
  """softmax(q k^T / sqrt(d)) with dropout on the probabilities, times v; (B, N, H, Dh).

  Both scales apply to (N, Dh) tensors, not to the (N, N) ones: XLA:CPU writes out a
  constant broadcast to every (heads, N, N) operand it multiplies. 1/sqrt(64) is a power
  of two, so scaling q first changes no bit of the logits.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
  valid = _key_mask(kv_seqlen, kv_mask, k.shape[1])
  if valid is not None:
    logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  keep = checkpoint_name(keep_mask(rng, rate, probs.shape), "attention_keep")
  probs = jnp.where(keep, probs, 0.0).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v) * (1.0 / (1.0 - rate))


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm / Segmenter layout)."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None  # None: XLA picks; "cudnn" on GPUs; "xla".

  @nn.compact
  def __call__(self, x, *, train: bool, kv_seqlen=None, kv_mask=None):
    # kv_seqlen: optional (B,) int32; keys at or past it get no attention (the +GT head
    # puts its oracle classes first and hides the rest). A length, not a boolean mask,
    # because cuDNN's fused kernel takes lengths natively, while a mask becomes a
    # (B, H, N, N) bias tensor that it reads, and rejects for odd N in training.
    # kv_mask: optional (B, N) bool, the keys that exist: the evaluation's small windows
    # run padded to the crop with their padding tokens hidden (XLA's attention).
    b, n, d = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=trunc_normal(), name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, h, d // h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, N, H, Dh)
    if train and self.dropout > 0.0:
      # Dropout on the attention probabilities (the Segmenter decoder trains with 0.1)
      # needs the probabilities themselves, so the fused kernel cannot be used here. They
      # are recomputed in the backward pass from q, k, v rather than stored: the
      # probabilities and their float32 softmax are (B, heads, N, N) floats per layer,
      # most of the decoder's activation memory. The keep mask, a byte per entry, is kept:
      # drawing it again cost more than the recomputed softmax (issue 25's profile).
      attend = functools.partial(_dropout_attention, rate=self.dropout, dtype=self.dtype)
      y = jax.checkpoint(attend, policy=_KEEP_MASK)(q, k, v, kv_seqlen, kv_mask,
                                                     self.make_rng("dropout"))
    elif kv_mask is not None:
      y = jax.nn.dot_product_attention(q, k, v, mask=_key_mask(kv_seqlen, kv_mask, n),
                                       implementation="xla")
    else:
      y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_seqlen,
                                       implementation=self.attention_impl)
    y = y.reshape(b, n, d)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="proj")(y)
    return Dropout(self.dropout)(y, deterministic=not train)


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=trunc_normal(), name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    y = Dropout(self.dropout)(y, deterministic=not train)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal(), name="fc2")(y)
    return Dropout(self.dropout)(y, deterministic=not train)


class Block(nn.Module):
  """Pre-norm transformer block, shared by the ViT and the mask transformer."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False, kv_seqlen=None, kv_mask=None):
    y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
    attn = SelfAttention(num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype,
                         attention_impl=self.attention_impl, name="attn")
    y = attn(y, train=train, kv_seqlen=kv_seqlen, kv_mask=kv_mask)
    x = x + DropPath(self.drop_path)(y, train=train)
    y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm2")(x)
    mlp = Mlp(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype, name="mlp")
    y = mlp(y, train=train)
    return x + DropPath(self.drop_path)(y, train=train)


def resize_pos_embed(pos_embed, new_grid: Sequence[int], old_grid: Sequence[int]):
  """Resizes a (1, 1 + gh*gw, D) position embedding; the [CLS] entry is kept as is.

  PyTorch's bicubic (a = -0.75, align_corners=False, no antialias), as mmseg's
  `resize_pos_embed` and timm's `resample_abs_pos_embed` use it.
  """
  new_grid, old_grid = tuple(new_grid), tuple(old_grid)
  if new_grid == old_grid:
    return pos_embed
  cls_entry, grid = pos_embed[:, :1], pos_embed[:, 1:]
  if grid.shape[1] != old_grid[0] * old_grid[1]:
    raise ValueError(f"pos_embed has {grid.shape[1]} grid entries, expected "
                     f"{old_grid[0]}x{old_grid[1]}")
  grid = grid.reshape(1, old_grid[0], old_grid[1], -1)
  grid = resize_bicubic(grid.astype(jnp.float32), new_grid).astype(pos_embed.dtype)
  return jnp.concatenate([cls_entry, grid.reshape(1, new_grid[0] * new_grid[1], -1)], 1)


def resize_pos_embed_to(pos_embed, valid_grid, padded_grid: Sequence[int],
                        old_grid: Sequence[int]):
  """`resize_pos_embed` per window to a traced grid: (1, 1 + gh*gw, D), valid_grid (B, 2)
  int32 -> (B, 1 + GH*GW, D) on the padded (GH, GW) grid, each window's embedding resized
  to its own (gh, gw) in the top-left cells, zero elsewhere."""
  cls_entry, grid = pos_embed[:, :1], pos_embed[:, 1:]
  grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
  mh = jnp.asarray(cubic_matrices(old_grid[0], padded_grid[0]))[valid_grid[:, 0]]
  mw = jnp.asarray(cubic_matrices(old_grid[1], padded_grid[1]))[valid_grid[:, 1]]
  hp = jax.lax.Precision.HIGHEST
  # The height first, then the width, as the static resize does.
  grid = jnp.einsum("bhy,yxd->bhxd", mh, grid, precision=hp)
  grid = jnp.einsum("bwx,bhxd->bhwd", mw, grid, precision=hp).astype(pos_embed.dtype)
  b = valid_grid.shape[0]
  return jnp.concatenate([jnp.broadcast_to(cls_entry, (b, 1, cls_entry.shape[-1])),
                          grid.reshape(b, padded_grid[0] * padded_grid[1], -1)], 1)


def grid_mask(valid_grid, padded_grid: Sequence[int]):
  """(B, 2) true token grids -> (B, GH*GW) bool, the cells of each window's own grid."""
  r = jnp.arange(padded_grid[0])[None, :, None] < valid_grid[:, 0, None, None]
  c = jnp.arange(padded_grid[1])[None, None, :] < valid_grid[:, 1, None, None]
  return (r & c).reshape(valid_grid.shape[0], -1)


# What a rematerialised block keeps for the backward pass (jax.checkpoint_policies).
REMAT_POLICIES = {
    # Only the block's input: the whole block runs again (~1/3 more FLOPs, least memory).
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Also the Dense outputs (qkv, proj, fc1, fc2): the backward recomputes only the
    # LayerNorms, GELU and attention, cheap next to the matmuls, for most of the saving.
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul output, the attention's batched ones included.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


class ViT(nn.Module):
  """ViT encoder returning the final-normed patch tokens on their (gh, gw) grid.

  Attributes:
    img_size: the training crop the position embedding is stored for (mmseg's
      `img_size`); other inputs resize it on the fly.
    num_class_tokens / class_token_start_layer: OCE (REFERENCE.md §4). n_cls tokens,
      without position embedding, join the sequence before that layer.
  """
  variant: str = "B/16"
  # Overrides of the variant's numbers, for tiny test and quickstart models.
  width_override: Optional[int] = None
  depth_override: Optional[int] = None
  heads_override: Optional[int] = None
  img_size: Sequence[int] = (512, 512)
  drop_path_rate: float = 0.1
  num_class_tokens: int = 0
  class_token_start_layer: int = 0
  class_token_init: str = "zeros"  # "zeros" with pretrained weights, "trunc_normal" from scratch.
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a name in REMAT_POLICIES
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @property
  def dims(self):
    """(width, depth, heads, patch) after overrides."""
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown ViT variant {self.variant!r}; known: {sorted(VARIANTS)}")
    width, depth, heads, patch = VARIANTS[self.variant]
    return (self.width_override or width, self.depth_override or depth,
            self.heads_override or heads, patch)

  @nn.compact
  def __call__(self, images, *, train: bool = False, valid_grid=None):
    """valid_grid: optional (B, 2) int32, each image's own token grid (gh, gw) when it is a
    smaller window zero-padded to `images`' size: its position embedding is resized to
    that grid and its padding tokens are hidden from attention, so its tokens there are
    the ones the unpadded window gives (the others are meaningless)."""
    width, depth, heads, p = self.dims
    if width % heads:
      raise ValueError(f"ViT width {width} is not divisible by {heads} heads")
    b, h, w, _ = images.shape
    # Pad bottom/right to a multiple of the patch, as mmseg's PatchEmbed does.
    pad_h, pad_w = -h % p, -w % p
    if pad_h or pad_w:
      images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    grid = ((h + pad_h) // p, (w + pad_w) // p)
    stored_grid = (self.img_size[0] // p, self.img_size[1] // p)

    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(images.astype(self.dtype))
    x = x.reshape(b, grid[0] * grid[1], width)  # (B, N, D)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], 1)
    pos = self.param("pos_embedding", trunc_normal(),
                     (1, 1 + stored_grid[0] * stored_grid[1], width))
    kv_mask = None
    if valid_grid is None:
      x = x + resize_pos_embed(pos, grid, stored_grid).astype(x.dtype)
    else:
      x = x + resize_pos_embed_to(pos, valid_grid, grid, stored_grid).astype(x.dtype)
      ones = lambda n: jnp.ones((b, n), bool)  # noqa: E731
      kv_mask = jnp.concatenate([ones(1), grid_mask(valid_grid, grid)], 1)

    class_tokens = None
    if self.num_class_tokens:
      init = (nn.initializers.zeros if self.class_token_init == "zeros"
              else trunc_normal())
      class_tokens = self.param("cls_emb", init, (1, self.num_class_tokens, width))
      if not 0 <= self.class_token_start_layer < depth:
        raise ValueError(f"class_token_start_layer={self.class_token_start_layer} "
                         f"outside the {depth} layers of {self.variant}")

    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of "
                       f"{sorted(REMAT_POLICIES)}")
    block = (nn.remat(Block, static_argnums=(2,), policy=REMAT_POLICIES[self.remat_policy])
             if self.remat else Block)
    rates = np.linspace(0.0, self.drop_path_rate, depth)
    for i in range(depth):
      if class_tokens is not None and i == self.class_token_start_layer:
        x = jnp.concatenate(
            [x, jnp.broadcast_to(class_tokens, (b,) + class_tokens.shape[1:]).astype(x.dtype)], 1)
        if kv_mask is not None:
          kv_mask = jnp.concatenate([kv_mask, ones(self.num_class_tokens)], 1)
      x = block(num_heads=heads, mlp_dim=4 * width, dropout=0.0, drop_path=float(rates[i]),
                eps=1e-6, dtype=self.dtype, attention_impl=self.attention_impl,
                name=f"blocks_{i}")(x, train, None, kv_mask)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)

    aux = {}
    if class_tokens is not None:
      aux["class_tokens"] = x[:, -self.num_class_tokens:]  # (B, n_cls, D)
      x = x[:, :-self.num_class_tokens]
    aux["cls_token"] = x[:, 0]
    tokens = x[:, 1:].reshape(b, grid[0], grid[1], width)  # (B, gh, gw, D)
    return tokens, aux
