"""MLSeg heads against PyTorch twins of the reference's heads, at batch 1 where it is defined.

The twins are written here from the reference's description (REFERENCE.md §3), with its
parameter names, so the converter tables of mlseg_jax/convert.py load their state dicts.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlseg_jax import checkpoint_rules, convert, losses
from mlseg_jax.models import decoders, mlseg, mlseg_ablations
from conftest import tiny_model_config

N_CLS, TOPK, D, D_ENC, HEADS, FF = 12, 5, 64, 48, 4, 256
IGNORE = 255  # The twins use mmseg's ignore value; ours is -1.


# ---------------------------------------------------------------------------------------
# Twins.


class TwinAttention(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
    y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)
    return self.proj(y.reshape(b, n, d))


class TwinMlp(nn.Module):
  def __init__(self, d, ff):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class TwinBlock(nn.Module):
  def __init__(self, d, heads, ff):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn, self.mlp = TwinAttention(d, heads), TwinMlp(d, ff)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TwinGroupWiseLinear(nn.Module):
  def __init__(self, n_cls, d):
    super().__init__()
    self.W = nn.Parameter(torch.randn(1, n_cls, d))
    self.b = nn.Parameter(torch.randn(1, n_cls))

  def forward(self, x):
    return (self.W * x).sum(-1) + self.b


class TwinSegmentation(nn.Module):
  """What the reference's heads share: the mask transformer over [patches; K class tokens]."""

  def __init__(self, n_layers, mask_norm_size, with_cls_emb=True):
    super().__init__()
    self.blocks = nn.ModuleList([TwinBlock(D, HEADS, FF) for _ in range(n_layers)])
    if with_cls_emb:
      self.cls_emb = nn.Parameter(torch.randn(1, N_CLS, D))
    self.proj_dec = nn.Linear(D_ENC, D)
    self.proj_patch = nn.Parameter(torch.randn(D, D) * D ** -0.5)
    self.proj_classes = nn.Parameter(torch.randn(D, D) * D ** -0.5)
    self.decoder_norm = nn.LayerNorm(D)
    if mask_norm_size:
      self.mask_norm = nn.LayerNorm(mask_norm_size)

  def segment(self, patches, chosen, blocks):
    """patches (1, N, D), chosen (1, K, D) -> (1, N, K) masks before mask_norm."""
    k = chosen.shape[1]
    x = torch.cat([patches, chosen], 1)
    for blk in blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    p = x[:, :-k] @ self.proj_patch
    c = x[:, -k:] @ self.proj_classes
    p, c = p / p.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
    return p @ c.transpose(1, 2)

  def select(self, img_pred, classes, patches, blocks, hw):
    """Top-k by descending score, the reference's one-image gather, masks over k slots."""
    topk = torch.argsort(img_pred, dim=1, descending=True)[:, :TOPK]
    chosen = classes.reshape(N_CLS, -1)[topk.reshape(-1)].reshape(1, TOPK, -1)
    masks = self.mask_norm(self.segment(patches, chosen, blocks))
    masks = masks.reshape(1, *hw, TOPK).permute(0, 3, 1, 2)
    full = torch.full((1, N_CLS, *hw), -100.0)
    full.scatter_(1, topk[:, :, None, None].expand(-1, -1, *hw), masks)
    return img_pred, topk, masks, full


class TwinRankSegHead(TwinSegmentation):
  """MaskTransformerRankSegHead: block 0 = multi-label branch, blocks 1.. segment."""

  def __init__(self, downsample, with_cls_emb=True):
    super().__init__(3, TOPK, with_cls_emb)
    self.downsample = downsample
    self.decoder_norm2 = nn.LayerNorm(D)
    self.ml_fc = TwinGroupWiseLinear(N_CLS, D)

  def forward(self, x, cls_emb=None):  # x (1, C, H, W)
    b, c, h, w = x.shape
    cls_emb = self.cls_emb if cls_emb is None else cls_emb
    patches = self.proj_dec(x.flatten(2).transpose(1, 2))
    if self.downsample:
      pooled = F.adaptive_avg_pool2d(x, self.downsample).flatten(2).transpose(1, 2)
      y = self.blocks[0](torch.cat([self.proj_dec(pooled), cls_emb], 1))
    else:
      y = self.blocks[0](torch.cat([patches, cls_emb], 1))
      patches = y[:, :-N_CLS]
    classes = self.decoder_norm2(y[:, -N_CLS:])
    return self.select(self.ml_fc(classes), classes, patches, self.blocks[1:], (h, w))


class TwinSine(nn.Module):
  def __init__(self, size, d):
    super().__init__()
    n = d // 2
    ones = torch.ones(1, size, size)
    ys = ones.cumsum(1) / (size + 1e-6) * 2 * math.pi
    xs = ones.cumsum(2) / (size + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * (torch.arange(n, dtype=torch.float32) // 2) / n)

    def feats(t):
      t = t[..., None] / freq
      return torch.stack([t[..., 0::2].sin(), t[..., 1::2].cos()], -1).flatten(3)

    self.register_buffer("pe", torch.cat([feats(ys), feats(xs)], 3).permute(0, 3, 1, 2))


class TwinQ2LLayer(nn.Module):
  def __init__(self, d, heads, ff):
    super().__init__()
    self.multihead_attn = nn.MultiheadAttention(d, heads)
    self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
    self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)

  def forward(self, tgt, memory, pos, query_pos):  # sequence-first, as torch's MHA
    y = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
    tgt = self.norm2(tgt + y)
    return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TwinQ2LDecoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.layers = nn.ModuleList([TwinQ2LLayer(D, 8, 2048) for _ in range(2)])
    self.norm = nn.LayerNorm(D)


class TwinTransformer(nn.Module):
  def __init__(self):
    super().__init__()
    self.decoder = TwinQ2LDecoder()


class TwinQuery2Label(nn.Module):
  """RankSegDecoderHead(share_embedding=True): the "2 TranDec Layers" classifier."""

  def __init__(self, size):
    super().__init__()
    self.transformer = TwinTransformer()
    self.position_embedding = TwinSine(size, D)
    self.input_proj = nn.Conv2d(D_ENC, D, 1)
    self.fc = TwinGroupWiseLinear(N_CLS, D)

  def forward(self, pooled, queries):  # (1, C, s, s), (n_cls, D)
    memory = self.input_proj(pooled).flatten(2).permute(2, 0, 1)  # (S, 1, D)
    pos = self.position_embedding.pe.flatten(2).permute(2, 0, 1)
    query_pos = queries[:, None]
    tgt = torch.zeros_like(query_pos)
    for layer in self.transformer.decoder.layers:
      tgt = layer(tgt, memory, pos, query_pos)
    return self.fc(self.transformer.decoder.norm(tgt).transpose(0, 1))


class TwinConvRelu(nn.Module):  # mmcv ConvModule without norm: .conv then ReLU.
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 1)

  def forward(self, x):
    return F.relu(self.conv(x))


class TwinDecoderHead(TwinSegmentation):
  """MaskTransformerRankSegDecoderHead: a separate classifier picks raw class embeddings."""

  def __init__(self, classifier, size=16):
    super().__init__(2, TOPK)
    self.size, self.classifier = size, classifier
    if classifier == "trandec":
      self.img_cls_head = TwinQuery2Label(size)
    else:
      self.img_cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), TwinConvRelu(D_ENC),
                                        nn.Conv2d(D_ENC, N_CLS, 1))

  def forward(self, x):
    b, c, h, w = x.shape
    pooled = F.adaptive_avg_pool2d(x, self.size)
    if self.classifier == "trandec":
      img_pred = self.img_cls_head(pooled, self.cls_emb[0])
    else:
      img_pred = self.img_cls_head(pooled).flatten(1)
    patches = self.proj_dec(x.flatten(2).transpose(1, 2))
    return self.select(img_pred, self.cls_emb, patches, self.blocks, (h, w))


class TwinSelectedLayerNorm(nn.Module):
  def __init__(self, n):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(n))
    self.beta = nn.Parameter(torch.zeros(n))

  def forward(self, x):  # (1, N, k): the first k slots, unbiased variance
    k = x.shape[-1]
    g, b = self.gamma[:k], self.beta[:k]
    centred = x - x.mean(-1, keepdim=True)
    if k == 1:
      return g * centred + b
    return g * centred / (x.var(-1, keepdim=True) + 1e-5).sqrt() + b


class TwinGTHead(TwinSegmentation):
  """MaskTransformerRankSegGTHead: the ground truth's classes, ascending, variable k."""

  def __init__(self):
    super().__init__(2, 0)
    self.mask_norm = TwinSelectedLayerNorm(N_CLS)

  def forward(self, x, target):  # target (1, H, W) with 255 = ignore
    b, c, h, w = x.shape
    hist = torch.histc(target.float(), bins=N_CLS, min=0, max=N_CLS - 1)
    index = torch.nonzero(hist > 0).reshape(-1)
    if index.numel() == 0:
      index = torch.zeros(1, dtype=torch.int64)
    k = index.numel()
    patches = self.proj_dec(x.flatten(2).transpose(1, 2))
    chosen = self.cls_emb.reshape(N_CLS, -1)[index][None]
    masks = self.mask_norm(self.segment(patches, chosen, self.blocks))
    masks = masks.reshape(1, h, w, k).permute(0, 3, 1, 2)
    full = torch.full((1, N_CLS, h, w), -100.0)
    full.scatter_(1, index[None, :, None, None].expand(-1, -1, h, w), masks)
    return index[None], masks, full


def reference_losses(img_pred, topk, masks, labels, weight=None, asl=None):
  """The reference's training losses on one image. labels (1, H, W), 255 = ignore."""
  hist = torch.histc(labels.float(), bins=N_CLS, min=0, max=N_CLS - 1)[None]
  out = {}
  if weight is not None:
    target = (hist > 0).float()
    out["loss_img"] = weight * (asl(img_pred, target) if asl else
                                F.binary_cross_entropy_with_logits(img_pred, target))
  logits = F.interpolate(masks, size=labels.shape[1:], mode="bilinear", align_corners=False)
  slot = torch.full_like(labels, IGNORE)
  for j in range(topk.shape[1]):
    slot[labels == topk[0, j]] = j
  slot[labels == IGNORE] = IGNORE
  out["loss_seg"] = F.cross_entropy(logits, slot, ignore_index=IGNORE, reduction="none").mean()
  out["acc_seg"] = 100.0 * (logits.argmax(1) == slot).float().sum() / slot.numel()
  picked = torch.gather(hist, 1, topk)
  out["pixel_recall"] = picked.sum() / hist.sum()
  out["image_recall"] = (picked > 0).float().sum() / (hist > 0).float().sum()
  out["image_accuracy"] = (picked > 0).float().sum() / topk.shape[1]
  return out


# ---------------------------------------------------------------------------------------
# Helpers.


def _randomised(module, seed=0):
  """Every tensor non-trivial (LayerNorms too), so every converted weight matters."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.dim() == 1:
        is_scale = name.endswith(".gamma") or ("norm" in name and name.endswith(".weight"))
        p.copy_((1.0 if is_scale else 0.0) + 0.1 * torch.randn_like(p))
      elif p.dim() == 4:  # conv (out, in, 1, 1)
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
  return module.eval()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(seed, grid=(5, 6), crop=(80, 96), classes=(0, 2, 3, 5, 7, 8, 11)):
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(1, *grid, D_ENC)).astype(np.float32)
  labels = rng.choice(np.asarray(classes), size=(1, *crop)).astype(np.int32)
  labels[:, :10, :7] = -1  # Ignore pixels, as padding leaves them.
  return tokens, labels


def _torch_labels(labels):
  return torch.from_numpy(np.where(labels < 0, IGNORE, labels).astype(np.int64))


def _config(decoder, **kw):
  kw.setdefault("n_layers", 3 if decoder == "mlseg" else 2)
  return tiny_model_config(decoder, num_classes=N_CLS, topk=TOPK, d_model=D, n_heads=HEADS,
                           d_ff=FF, **kw)


def _converted(head, twin, rules, tokens, labels=None, class_emb=None, dropped=()):
  target = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), tokens, class_emb,
                                            labels=labels))["params"]
  return convert.to_params(twin.state_dict(), rules, target, dropped=dropped)


def _check_selected_path(out, ref, c, labels, ref_losses):
  img_pred, topk, masks, full = ref
  assert _rel(out["image_logits"], img_pred.detach().numpy()) < 1e-5
  np.testing.assert_array_equal(out["topk_index"], topk.numpy())
  assert _rel(out["rank_logits"], masks.permute(0, 2, 3, 1).detach().numpy()) < 1e-5
  full = full.permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_array_equal(np.asarray(out["logits"]) == -100, full == -100)
  assert _rel(out["logits"], full) < 1e-5
  loss, metrics = losses.mlseg_losses(out, jnp.asarray(labels), c)
  for name, value in ref_losses.items():
    np.testing.assert_allclose(metrics[name], float(value), rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(loss, float(ref_losses["loss_img"] + ref_losses["loss_seg"]),
                             rtol=2e-5)


# ---------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("hw,out", [((32, 32), 8), ((30, 30), 8), ((4, 4), 8), ((5, 7), 8),
                                    ((30, 40), 16), ((40, 40), 16), ((3, 2), 16)])
def test_adaptive_avg_pool_matches_pytorch(hw, out):
  x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
  ref = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out)
  ours = mlseg.adaptive_avg_pool(jnp.asarray(x), (out, out))
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_sine_position_embedding_matches_the_reference_table():
  ref = TwinSine(16, D).pe[0].permute(1, 2, 0).reshape(256, D).numpy()
  np.testing.assert_allclose(mlseg_ablations.sine_position_embedding(16, 16, D), ref, atol=2e-6)


@pytest.mark.parametrize("downsample,oce", [(8, False), (0, False), (8, True)])
def test_parity_with_torch_rankseg_head_at_batch_1(downsample, oce):
  twin = _randomised(TwinRankSegHead(downsample, with_cls_emb=not oce))
  c = _config("mlseg", pool_grid=downsample, oce=oce)
  head = decoders.DECODERS["mlseg"].build(c, jnp.float32)
  tokens, labels = _inputs(1)
  class_emb = (np.random.default_rng(2).normal(size=(1, N_CLS, D)).astype(np.float32)
               if oce else None)
  params = _converted(head, twin, decoders.decoder_spec(c).reference_rules(c, prefix="", path=()),
                      tokens, class_emb=class_emb)
  out = head.apply({"params": params}, tokens, class_emb)
  with torch.no_grad():
    ref = twin(torch.from_numpy(tokens).permute(0, 3, 1, 2),
               None if class_emb is None else torch.from_numpy(class_emb))
    ref_losses = reference_losses(*ref[:3], _torch_labels(labels), weight=c.img_loss_weight)
  _check_selected_path(out, ref, c, labels, ref_losses)


def _reference_asl(gamma_neg, gamma_pos, clip=0.05, eps=1e-5):
  def loss(x, y):
    p = torch.sigmoid(x)
    q = (1 - p + clip).clamp(max=1)
    total = y * p.clamp(min=eps).log() + (1 - y) * q.clamp(min=eps).log()
    w = torch.pow(1 - p * y - q * (1 - y), gamma_pos * y + gamma_neg * (1 - y))
    return -(total * w).sum() / x.shape[0] / x.shape[1]
  return loss


def test_parity_of_training_losses_with_asymmetric_loss():
  twin = _randomised(TwinRankSegHead(8), seed=3)
  c = _config("mlseg", img_loss="asl", gamma_neg=2.0, gamma_pos=0.0, img_loss_weight=5.0)
  head = decoders.DECODERS["mlseg"].build(c, jnp.float32)
  tokens, labels = _inputs(4)
  params = _converted(head, twin, checkpoint_rules.mlseg_head_rules(3, prefix="", path=()), tokens)
  out = head.apply({"params": params}, tokens)
  with torch.no_grad():
    ref = twin(torch.from_numpy(tokens).permute(0, 3, 1, 2))
    ref_losses = reference_losses(*ref[:3], _torch_labels(labels), weight=5.0,
                                  asl=_reference_asl(2.0, 0.0))
  _check_selected_path(out, ref, c, labels, ref_losses)


@pytest.mark.parametrize("decoder", ["mlseg_pooling", "mlseg_trandec"])
def test_parity_with_torch_ablation_heads_at_batch_1(decoder):
  classifier = decoder.split("_")[1]
  twin = _randomised(TwinDecoderHead(classifier), seed=5)
  c = _config(decoder, pool_grid=16, img_loss="asl", gamma_neg=0.0, gamma_pos=0.0)
  head = decoders.DECODERS[decoder].build(c, jnp.float32)
  tokens, labels = _inputs(6, grid=(6, 5), crop=(96, 80))
  rules = decoders.decoder_spec(c).reference_rules(c, prefix="", path=())
  params = _converted(head, twin, rules, tokens, dropped=checkpoint_rules.TRANDEC_DROPPED)
  out = head.apply({"params": params}, tokens)
  assert out["rank_logits"].shape == (1, 6, 5, TOPK)
  with torch.no_grad():
    ref = twin(torch.from_numpy(tokens).permute(0, 3, 1, 2))
    ref_losses = reference_losses(*ref[:3], _torch_labels(labels), weight=c.img_loss_weight,
                                  asl=_reference_asl(0.0, 0.0))
  _check_selected_path(out, ref, c, labels, ref_losses)


@pytest.mark.parametrize("classes", [(0, 2, 3, 5, 7, 8, 11), (4,), ()])
def test_parity_with_torch_gt_head_at_batch_1(classes):
  """Several classes, one class (the reference skips the division), none (class 0)."""
  twin = _randomised(TwinGTHead(), seed=7)
  c = _config("mlseg_gt")
  head = decoders.DECODERS["mlseg_gt"].build(c, jnp.float32)
  tokens, labels = _inputs(8, classes=classes or (0,))
  if not classes:
    labels[:] = -1
  params = _converted(head, twin, decoders.decoder_spec(c).reference_rules(c, prefix="", path=()),
                      tokens, labels=labels)
  out = head.apply({"params": params}, tokens, labels=labels)
  with torch.no_grad():
    index, masks, full = twin(torch.from_numpy(tokens).permute(0, 3, 1, 2),
                              _torch_labels(labels))
    ref_losses = reference_losses(None, index, masks, _torch_labels(labels))
  expected_set = np.zeros(N_CLS, bool)
  expected_set[index.numpy()] = True
  np.testing.assert_array_equal(out["label_set"][0], expected_set)
  full = full.permute(0, 2, 3, 1).numpy()
  assert _rel(out["logits"], full) < 1e-5
  loss, metrics = losses.mlseg_losses(out, jnp.asarray(labels), c)
  np.testing.assert_allclose(loss, float(ref_losses["loss_seg"]), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["acc_seg"], float(ref_losses["acc_seg"]), rtol=1e-5)
  assert "loss_img" not in metrics
