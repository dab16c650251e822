"""Converted checkpoints predict what their PyTorch source predicts.

Sources: timm ViTs (.pth, .safetensors), an AugReg `.npz` in the exact big_vision layout
(cross-checked with timm's own npz loader), and mmseg 1.x / reference Segmenters built from
PyTorch twins that carry those libraries' parameter names (mmcv's TransformerEncoderLayer
with a real nn.MultiheadAttention at `attn.attn`, so `in_proj_weight` is the real thing).
"""

import jax
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import tiny_model_config
from mlseg_jax import convert, pretrained
from mlseg_jax.models.segmenter import build_model
from torch_twins import TwinMaskTransformer, randomize_

WIDTH, DEPTH, HEADS, N_CLS = 64, 2, 4, 5


def _rel(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return np.linalg.norm(ours - ref) / np.linalg.norm(ref)


def _images(n=2, size=64, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _nchw(images):
  return torch.from_numpy(images).permute(0, 3, 1, 2)


# --- mmcv-named twins ------------------------------------------------------------------


class MmcvAttention(nn.Module):
  """mmcv's MultiheadAttention wrapper: the torch module sits at `.attn`."""

  def __init__(self, dim, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

  def forward(self, x):
    return self.attn(x, x, x, need_weights=False)[0]


class MmcvFFN(nn.Module):
  """mmcv's FFN: layers = [[Linear, GELU, Dropout], Linear, Dropout]."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
                                nn.Linear(hidden, dim), nn.Dropout(0.0))

  def forward(self, x):
    return self.layers(x)


class MmcvLayer(nn.Module):
  """mmseg's TransformerEncoderLayer (pre-norm)."""

  def __init__(self, dim, heads, hidden, eps):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=eps)
    self.attn = MmcvAttention(dim, heads)
    self.ln2 = nn.LayerNorm(dim, eps=eps)
    self.ffn = MmcvFFN(dim, hidden)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.ffn(self.ln2(x))


class PatchEmbed(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.projection = nn.Conv2d(3, dim, 16, stride=16)


class MmcvViT(nn.Module):
  """mmseg's VisionTransformer, final_norm=True, on inputs of its img_size; with
  `n_cls_emb` the reference's OCE class tokens join before layer `cls_emb_start_layer`."""

  def __init__(self, img_size=64, n_cls_emb=0, cls_emb_start_layer=1):
    super().__init__()
    self.patch_embed = PatchEmbed(WIDTH)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // 16) ** 2, WIDTH))
    self.cls_emb = nn.Parameter(torch.zeros(1, n_cls_emb, WIDTH)) if n_cls_emb else None
    self.cls_emb_start_layer = cls_emb_start_layer
    self.layers = nn.ModuleList([MmcvLayer(WIDTH, HEADS, 4 * WIDTH, 1e-6)
                                 for _ in range(DEPTH)])
    self.ln1 = nn.LayerNorm(WIDTH, eps=1e-6)

  def forward(self, images):
    x = self.patch_embed.projection(images)
    b, _, h, w = x.shape
    x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + self.pos_embed
    for i, layer in enumerate(self.layers):
      if self.cls_emb is not None and i == self.cls_emb_start_layer:
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], 1)
      x = layer(x)
    x = self.ln1(x)[:, 1:]
    cls_emb = None
    if self.cls_emb is not None:
      x, cls_emb = x[:, :-self.cls_emb.shape[1]], x[:, -self.cls_emb.shape[1]:]
    return x.transpose(1, 2).reshape(b, WIDTH, h, w), cls_emb


class MmsegMaskHead(nn.Module):
  """mmseg 1.x's SegmenterMaskTransformerHead, with BaseDecodeHead's unused conv_seg."""

  def __init__(self, n_cls, d_model=64, n_layers=2):
    super().__init__()
    self.n_cls = n_cls
    self.layers = nn.ModuleList([MmcvLayer(d_model, HEADS, 4 * d_model, 1e-5)
                                 for _ in range(n_layers)])
    self.dec_proj = nn.Linear(WIDTH, d_model)
    self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
    self.patch_proj = nn.Linear(d_model, d_model, bias=False)
    self.classes_proj = nn.Linear(d_model, d_model, bias=False)
    self.decoder_norm = nn.LayerNorm(d_model)
    self.mask_norm = nn.LayerNorm(n_cls)
    self.conv_seg = nn.Conv2d(WIDTH, n_cls, 1)

  def forward(self, features, cls_emb=None):
    b, c, h, w = features.shape
    x = self.dec_proj(features.permute(0, 2, 3, 1).reshape(b, h * w, c))
    x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], 1)
    for layer in self.layers:
      x = layer(x)
    x = self.decoder_norm(x)
    patches = self.patch_proj(x[:, :-self.n_cls])
    classes = self.classes_proj(x[:, -self.n_cls:])
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = self.mask_norm(patches @ classes.transpose(1, 2))
    return masks.transpose(1, 2).reshape(b, self.n_cls, h, w)


class FCNLinearHead(nn.Module):
  """mmseg 1.x's Segmenter "linear" head: FCNHead(num_convs=0) = its 1x1 conv_seg."""

  def __init__(self, n_cls):
    super().__init__()
    self.conv_seg = nn.Conv2d(WIDTH, n_cls, 1)

  def forward(self, features, cls_emb=None):
    return self.conv_seg(features)


class ReferenceLinearHead(nn.Module):
  """The reference's DecoderLinear (`head`)."""

  def __init__(self, n_cls):
    super().__init__()
    self.head = nn.Linear(WIDTH, n_cls)

  def forward(self, features, cls_emb=None):
    return self.head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ReferenceMaskHead(TwinMaskTransformer):
  """The reference's MaskTransformerHead; with OCE (`cls_emb_from_backbone=True`) it has no
  cls_emb of its own and takes the backbone's class tokens."""

  def __init__(self, n_cls, cls_emb_from_backbone=False):
    super().__init__(n_cls, WIDTH, 2, HEADS, 64, 256)
    if cls_emb_from_backbone:
      del self.cls_emb

  def forward(self, features, cls_emb=None):
    if cls_emb is None:
      return super().forward(features)
    b, c, h, w = features.shape
    x = torch.cat([self.proj_dec(features.flatten(2).transpose(1, 2)), cls_emb], 1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    patches = x[:, :-self.n_cls] @ self.proj_patch
    classes = x[:, -self.n_cls:] @ self.proj_classes
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = self.mask_norm(patches @ classes.transpose(1, 2))
    return masks.transpose(1, 2).reshape(b, self.n_cls, h, w)


class TwinSegmenter(nn.Module):

  def __init__(self, backbone, decode_head):
    super().__init__()
    self.backbone = backbone
    self.decode_head = decode_head

  def forward(self, images):
    features, cls_emb = self.backbone(images)
    return self.decode_head(features, cls_emb)


def _twin(seed, backbone, head):
  torch.manual_seed(seed)
  return randomize_(TwinSegmenter(backbone, head)).eval()


def _segmenter_logits(model_config, params, images):
  # One compile of the whole model beats op-by-op dispatch by far on a busy CPU.
  apply = jax.jit(build_model(model_config).apply)
  return apply({"params": params}, images)["logits"]


def _assert_logits_match(model_config, params, twin, images):
  with torch.no_grad():
    ref = twin(_nchw(images)).permute(0, 2, 3, 1).numpy()  # (B, h, w, n_cls)
  rel = _rel(_segmenter_logits(model_config, params, images), ref)
  assert rel < 1e-4, rel


# --- mmseg 1.x and the reference --------------------------------------------------------


MMSEG_CASES = {
    "mask_transformer": lambda: _twin(0, MmcvViT(), MmsegMaskHead(N_CLS)),
    "linear": lambda: _twin(1, MmcvViT(), FCNLinearHead(N_CLS)),
}


@pytest.mark.parametrize("decoder", sorted(MMSEG_CASES))
def test_mmseg_segmenter_checkpoint_predicts_like_its_twin(tmp_path, decoder):
  twin = MMSEG_CASES[decoder]()
  path = tmp_path / "segmenter_mmseg.pth"
  torch.save({"meta": {"mmseg_version": "1.2.2", "dataset_meta": {"classes": ("a",) * N_CLS}},
              "state_dict": twin.state_dict()}, path)
  c = tiny_model_config(decoder, num_classes=N_CLS)
  params, not_filled = convert.convert_checkpoint("mmseg", path, c)
  assert not_filled == []
  _assert_logits_match(c, params, twin, _images())


REFERENCE_CASES = {
    "mask_transformer": (dict(), lambda: _twin(2, MmcvViT(), ReferenceMaskHead(N_CLS))),
    "mask_transformer_oce": (
        dict(oce=True),
        lambda: _twin(3, MmcvViT(n_cls_emb=N_CLS, cls_emb_start_layer=1),
                      ReferenceMaskHead(N_CLS, cls_emb_from_backbone=True))),
    "linear": (dict(), lambda: _twin(4, MmcvViT(), ReferenceLinearHead(N_CLS))),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_segmenter_checkpoint_predicts_like_its_twin(tmp_path, case):
  overrides, make_twin = REFERENCE_CASES[case]
  twin = make_twin()
  path = tmp_path / "iter_40000.pth"
  torch.save({"meta": {"iter": 40000}, "state_dict": twin.state_dict()}, path)
  c = tiny_model_config(case.replace("_oce", ""), num_classes=N_CLS, oce_start_layer=1,
                        **overrides)
  params, not_filled = convert.convert_checkpoint("reference", path, c)
  assert not_filled == []
  _assert_logits_match(c, params, twin, _images(seed=1))
  # And back: the exported names are the twin's own, tensor for tensor.
  pretrained.save_params(tmp_path / "orbax", params, model_config=c)
  state = convert.export_torch(tmp_path / "orbax", tmp_path / "back.pth")
  twin_state = twin.state_dict()
  assert sorted(state) == sorted(twin_state)
  for k, v in twin_state.items():
    np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)


# --- timm and AugReg --------------------------------------------------------------------


def _timm_vit(img_size=64, seed=0):
  from timm.models.vision_transformer import VisionTransformer

  torch.manual_seed(seed)
  return randomize_(VisionTransformer(img_size=img_size, patch_size=16, embed_dim=WIDTH,
                                      depth=DEPTH, num_heads=HEADS, num_classes=10), 0.02).eval()


def _timm_patch_tokens(timm_model, images):
  with torch.no_grad():
    out = timm_model.forward_features(_nchw(images)).numpy()[:, 1:]
  g = images.shape[1] // 16
  return out.reshape(len(images), g, g, WIDTH)


def _tokens_after_init_from(model_config, directory, images):
  """What training would see: a Segmenter's init overwritten by the converted files."""
  fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype),
                                 convert.abstract_params(model_config))
  params, kept = pretrained.init_from(fresh, directory)
  assert kept and all(p.startswith("decode_head/") for p in kept), kept
  return jax.jit(build_model(model_config).apply)({"params": params}, images)["tokens"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_files_initialise_the_backbone_like_timm(tmp_path, suffix):
  import safetensors.torch

  timm_model = _timm_vit()
  path = tmp_path / f"vit{suffix}"
  if suffix == ".pth":
    torch.save(timm_model.state_dict(), path)
  else:
    safetensors.torch.save_file(timm_model.state_dict(), str(path))
  c = tiny_model_config("mask_transformer", num_classes=N_CLS)
  not_filled = convert.convert_to_orbax("timm", path, c, tmp_path / "orbax")
  assert not_filled and all(p.startswith("decode_head/") for p in not_filled)
  assert pretrained.load_info(tmp_path / "orbax")["source"]["backbone_only"] is True
  images = _images()
  tokens = _tokens_after_init_from(c, tmp_path / "orbax", images)
  rel = _rel(tokens, _timm_patch_tokens(timm_model, images))
  assert rel < 1e-5, rel


def _augreg_npz(path, grid, seed=0):
  """A random ViT in the exact layout of the AugReg `.npz` files (per-head attention
  kernels, Flax Dense (in, out) and Conv HWIO kernels, `head` and `pre_logits`)."""
  rng = np.random.default_rng(seed)
  dh = WIDTH // HEADS
  r = lambda *shape: (0.05 * rng.normal(size=shape)).astype(np.float32)
  w = {
      "embedding/kernel": r(16, 16, 3, WIDTH), "embedding/bias": r(WIDTH),
      "cls": r(1, 1, WIDTH),
      "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, WIDTH),
      "Transformer/encoder_norm/scale": 1 + r(WIDTH), "Transformer/encoder_norm/bias": r(WIDTH),
      "head/kernel": r(WIDTH, 10), "head/bias": r(10),
      "pre_logits/kernel": r(WIDTH, WIDTH), "pre_logits/bias": r(WIDTH),
  }
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}/"
    mha = f"{b}MultiHeadDotProductAttention_1/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = 1 + r(WIDTH), r(WIDTH)
    for n in ("query", "key", "value"):
      w[f"{mha}{n}/kernel"], w[f"{mha}{n}/bias"] = r(WIDTH, HEADS, dh), r(HEADS, dh)
    w[f"{mha}out/kernel"], w[f"{mha}out/bias"] = r(HEADS, dh, WIDTH), r(WIDTH)
    w[f"{b}MlpBlock_3/Dense_0/kernel"] = r(WIDTH, 4 * WIDTH)
    w[f"{b}MlpBlock_3/Dense_0/bias"] = r(4 * WIDTH)
    w[f"{b}MlpBlock_3/Dense_1/kernel"] = r(4 * WIDTH, WIDTH)
    w[f"{b}MlpBlock_3/Dense_1/bias"] = r(WIDTH)
  np.savez(path, **w)
  return w


def test_augreg_npz_loads_like_timms_own_npz_loader(tmp_path):
  from timm.models.vision_transformer import _load_weights

  path = tmp_path / "augreg.npz"
  _augreg_npz(path, grid=6)  # Stored for 96 px, as the real ones are for 384.
  timm_model = _timm_vit(img_size=96)
  _load_weights(timm_model, str(path))
  c = tiny_model_config("mask_transformer", num_classes=N_CLS, img_size=(96, 96))
  convert.convert_to_orbax("augreg_npz", path, c, tmp_path / "orbax")
  images = _images(size=96)
  rel = _rel(_tokens_after_init_from(c, tmp_path / "orbax", images),
             _timm_patch_tokens(timm_model, images))
  assert rel < 1e-5, rel

  # For a 64 px crop the 6x6 grid becomes 4x4 with PyTorch's bicubic, as mmseg does when it
  # loads the npz (timm's own loader would use bilinear, hence the explicit reference).
  c64 = tiny_model_config("mask_transformer", num_classes=N_CLS, img_size=(64, 64))
  params, not_filled = convert.convert_checkpoint("augreg_npz", path, c64)
  assert all(p.startswith("decode_head/") for p in not_filled)
  pe = timm_model.pos_embed.detach()
  grid = pe[:, 1:].reshape(1, 6, 6, WIDTH).permute(0, 3, 1, 2)
  grid = nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
  resized = torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], 1)
  np.testing.assert_allclose(params["backbone"]["pos_embedding"], resized.numpy(), atol=1e-6)
  timm64 = _timm_vit(img_size=64)
  timm64.load_state_dict(dict(timm_model.state_dict(), pos_embed=resized))
  images = _images(size=64)
  tokens = jax.jit(build_model(c64).backbone.apply)({"params": params["backbone"]}, images)[0]
  assert _rel(tokens, _timm_patch_tokens(timm64, images)) < 1e-5


def test_augreg_npz_with_a_missing_or_extra_tensor_is_named(tmp_path):
  c = tiny_model_config("mask_transformer", num_classes=N_CLS)
  w = _augreg_npz(tmp_path / "full.npz", grid=4)
  del w["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/bias"]
  np.savez(tmp_path / "no_key.npz", **w)
  with pytest.raises(convert.ConversionError, match="missing key 'Transformer/encoderblock_1/"
                                                    "MultiHeadDotProductAttention_1/key/bias'"):
    convert.convert_checkpoint("augreg_npz", tmp_path / "no_key.npz", c)
  w = _augreg_npz(tmp_path / "full.npz", grid=4)
  np.savez(tmp_path / "extra.npz", **w, **{"Transformer/encoderblock_0/LayerNorm_1/scale":
                                           np.ones(WIDTH, np.float32)})
  with pytest.raises(convert.ConversionError,
                     match="unexpected key 'Transformer/encoderblock_0/LayerNorm_1/scale'"):
    convert.convert_checkpoint("augreg_npz", tmp_path / "extra.npz", c)
  deeper = tiny_model_config("mask_transformer", num_classes=N_CLS, backbone_depth=3)
  with pytest.raises(convert.ConversionError,
                     match="missing key 'Transformer/encoderblock_2/LayerNorm_0/scale'"):
    convert.convert_checkpoint("augreg_npz", tmp_path / "full.npz", deeper)


def test_augreg_training_checkpoints_under_opt_target_convert_the_same(tmp_path):
  c = tiny_model_config("mask_transformer", num_classes=N_CLS)
  w = _augreg_npz(tmp_path / "plain.npz", grid=4)
  np.savez(tmp_path / "train.npz", **{f"opt/target/{k}": v for k, v in w.items()},
           **{"opt/state/step": np.zeros(())})
  plain, _ = convert.convert_checkpoint("augreg_npz", tmp_path / "plain.npz", c)
  wrapped, _ = convert.convert_checkpoint("augreg_npz", tmp_path / "train.npz", c)
  for path, value in convert.flatten(plain).items():
    np.testing.assert_array_equal(convert.flatten(wrapped)[path], value)
