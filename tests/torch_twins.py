"""PyTorch twins of the reference's modules, in our own words, with its parameter names.

Used only by the parity tests: same names as the reference's state dicts, so a twin's
`state_dict()` goes through the same converters as a real checkpoint.
"""

import torch
import torch.nn as nn


class TwinAttention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
    return self.proj((probs @ v).transpose(1, 2).reshape(b, n, d))


class TwinMlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class TwinBlock(nn.Module):

  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = TwinAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = TwinMlp(dim, hidden)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def randomize_(module, scale=0.1):
  """Moves every parameter off its init (LayerNorm ones/zeros hide mistakes)."""
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))
  return module


class TwinMaskTransformer(nn.Module):
  """Segmenter's MaskTransformerHead (eval mode: dropout is a no-op)."""

  def __init__(self, n_cls, d_encoder, n_layers, n_heads, d_model, d_ff):
    super().__init__()
    self.n_cls = n_cls
    self.proj_dec = nn.Linear(d_encoder, d_model)
    self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
    self.blocks = nn.ModuleList([TwinBlock(d_model, n_heads, d_ff) for _ in range(n_layers)])
    self.decoder_norm = nn.LayerNorm(d_model)
    self.proj_patch = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
    self.proj_classes = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
    self.mask_norm = nn.LayerNorm(n_cls)

  def forward(self, x):  # x: (B, C, H, W) as the backbone hands it over.
    b, c, h, w = x.shape
    x = self.proj_dec(x.flatten(2).transpose(1, 2))
    x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], 1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    patches = x[:, :-self.n_cls] @ self.proj_patch
    classes = x[:, -self.n_cls:] @ self.proj_classes
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = self.mask_norm(patches @ classes.transpose(1, 2))
    return masks.transpose(1, 2).reshape(b, self.n_cls, h, w)
