"""Analytic FLOPs of the model and MFU.

Every matmul / conv / dot-product contraction of the model, 2 FLOPs per multiply-add. Not
counted: elementwise work (norms, GELU, softmax, the optimizer), the position-embedding
resize (absent at the training crop), gathers and the loss. A training step is 3x the
forward (the backward pass costs two forwards): the usual "model FLOPs" definition, no
remat recomputation.
"""

from __future__ import annotations

from mlseg_jax.models import mlseg_ablations
from mlseg_jax.models.decoders import decoder_spec
from mlseg_jax.models.vit import ViT

# The selecting MLSeg heads (their losses read the k rank slots, not the n_cls classes).


def block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """One pre-norm transformer block over `tokens` tokens, per image.

  qkv 2*n*d*3d + attention logits and values 2 * 2*n*n*d + proj 2*n*d*d + MLP 2 * 2*n*d*f.
  """
  n, d, f = tokens, width, mlp_dim
  return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * f


def backbone_dims(model_config) -> tuple[int, int, int, int]:
  """(width, depth, heads, patch) of the config's ViT, after the tiny-model overrides."""
  c = model_config
  return ViT(variant=c.backbone, width_override=c.backbone_width,
             depth_override=c.backbone_depth, heads_override=c.backbone_heads).dims


def flop_breakdown(config, image_size=None, *, train: bool = True) -> dict[str, int]:
  """Forward matmul FLOPs of ONE image, per part of the model.

  image_size: (H, W) of the input (default: the training crop). `train` only changes which
  logits are upsampled to the image: the k rank slots the MLSeg loss reads in training,
  all n_cls classes at evaluation.
  """
  m = config.model
  h, w = tuple(image_size) if image_size is not None else tuple(config.data.crop_size)
  width, depth, _, p = backbone_dims(m)
  gh, gw = -(-h // p), -(-w // p)
  n_patch = gh * gw
  n_cls, d, f = m.num_classes, m.d_model, m.d_ff
  out = {}

  # Backbone: patch embedding (a p x p stride-p conv = one matmul per patch) + blocks over
  # [CLS; patches], joined by n_cls class tokens from `oce_start_layer` with OCE.
  out["patch_embedding"] = 2 * n_patch * (p * p * 3) * width
  vit = 0
  for i in range(depth):
    tokens = 1 + n_patch + (n_cls if m.oce and i >= m.oce_start_layer else 0)
    vit += block_flops(tokens, width, 4 * width)
  out["vit_blocks"] = vit

  decoder, masks = 0, 0
  upsampled = n_cls
  if m.decoder == "linear":
    decoder = 2 * n_patch * width * n_cls
  elif m.decoder == "mask_transformer":
    decoder = 2 * n_patch * width * d  # proj_dec
    decoder += m.n_layers * block_flops(n_patch + n_cls, d, f)
    masks = 2 * n_patch * d * d + 2 * n_cls * d * d + 2 * n_patch * n_cls * d
  elif m.decoder == "mlseg_gt":
    # Static shapes: every class token runs, the absent ones masked out of attention.
    decoder = 2 * n_patch * width * d + m.n_layers * block_flops(n_patch + n_cls, d, f)
    masks = 2 * n_patch * d * d + 2 * n_cls * d * d + 2 * n_patch * n_cls * d
  elif decoder_spec(m).selects_topk:
    k, s = m.topk, m.pool_grid
    decoder = 2 * n_patch * width * d  # proj_dec over the patch tokens
    if m.decoder == "mlseg":
      # Block 0: the class tokens with the s x s pooled tokens (all patches when s = 0),
      # then GroupWiseLinear (one d-dot per class); blocks 1.. segment with the top k.
      if s:
        decoder += 2 * s * s * width * d  # proj_dec over the pooled tokens
      decoder += block_flops((s * s if s else n_patch) + n_cls, d, f)
      decoder += 2 * n_cls * d
      seg_layers = m.n_layers - 1
    else:
      pooled = s * s
      if m.decoder == "mlseg_trandec":
        e = mlseg_ablations.TRANDEC_FFN
        decoder += 2 * pooled * width * d  # input_proj, a 1x1 conv
        per_layer = (2 * n_cls * d * d + 2 * 2 * pooled * d * d  # q; k and v projections
                     + 2 * 2 * n_cls * pooled * d  # logits and values
                     + 2 * n_cls * d * d + 2 * 2 * n_cls * d * e)  # out_proj; FFN
        decoder += mlseg_ablations.TRANDEC_LAYERS * per_layer + 2 * n_cls * d  # + GroupWiseLinear
      else:  # Global pooling: two 1x1 convs on the mean token.
        decoder += 2 * width * width + 2 * width * n_cls
      seg_layers = m.n_layers
    decoder += seg_layers * block_flops(n_patch + k, d, f)
    masks = 2 * n_patch * d * d + 2 * k * d * d + 2 * n_patch * k * d
    if train:
      upsampled = k
  else:
    raise ValueError(f"model.decoder={m.decoder!r}: no FLOP count for it")
  out["decoder"] = decoder
  out["masks"] = masks
  # Bilinear upsampling to the image, two matmuls (rows first, as resize.py does it).
  out["upsample"] = 2 * upsampled * (h * gh * gw + h * w * gw)
  return out


def model_flops(config, batch: int, *, train: bool = True, image_size=None) -> int:
  """Analytic FLOPs of one training step (3x the forward: the backward pass costs two
  forwards) or, with train=False, one forward, over `batch` images."""
  forward = sum(flop_breakdown(config, image_size, train=train).values())
  return batch * forward * (3 if train else 1)


def backbone_flops(config, batch: int) -> int:
  """Analytic FLOPs of the ViT alone, forward + backward, over `batch` training crops:
  the torch peer's workload."""
  parts = flop_breakdown(config)
  return 3 * batch * (parts["patch_embedding"] + parts["vit_blocks"])


def achieved_tflops(flops: float, seconds: float, num_devices: int = 1) -> float:
  """TFLOP/s per device for `flops` spread evenly over `num_devices` in `seconds`."""
  if seconds <= 0 or num_devices <= 0:
    raise ValueError(f"seconds={seconds} and num_devices={num_devices} must be positive")
  return flops / num_devices / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float, num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved FLOP/s per device over the per-device peak (0..1)."""
  if peak_tflops <= 0:
    raise ValueError(f"peak_tflops={peak_tflops} must be positive")
  return achieved_tflops(flops, seconds, num_devices) / peak_tflops
