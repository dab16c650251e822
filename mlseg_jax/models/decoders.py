"""Every decoder a config can name (`config.model.decoder`), in one table.

A `DecoderSpec` says how its head is built from the model config, which loss trains it, and
what the rest of the code needs to know about it, so nothing else compares decoder names:

  selects_topk   an MLSeg head that picks each image's k classes: `model.topk` is its k,
                 evaluation passes it on and reports the multi-label metrics.
  needs_labels   the +GT oracle, whose class set is the ground truth's at training and at
                 test: evaluation hands every image's classes to it, prediction on
                 unlabelled images is impossible.
  reference_rules, mmseg_rules
                 its head's rule table (`checkpoint_rules.py`) in the reference's checkpoints
                 and in mmseg 1.x's, from the model config (`convert.py` adds the
                 backbone's); `*_dropped`: the head's keys there that are knowingly unused.
                 mmseg_rules=None: mmseg has no such head.
  masks_padding  the head takes `valid_grid` (`Segmenter`): a small window padded to the
                 crop gives, in its own cells, the logits of the unpadded window, so the
                 evaluation runs every small window at the crop's shape (one program).

The reference's class for each name is in `mlseg.py`'s docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import ml_collections

from mlseg_jax import checkpoint_rules as rules
from mlseg_jax import losses
from mlseg_jax.models import mlseg, mlseg_ablations, mlseg_gt
from mlseg_jax.models.mask_transformer import LinearDecoder, MaskTransformer


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  name: str
  build: Callable[[ml_collections.ConfigDict, Any], nn.Module]  # (model config, dtype)
  # (outputs, labels, model config) -> (total loss, scalars to log)
  loss: Callable[[dict, Any, ml_collections.ConfigDict], tuple]
  selects_topk: bool = False
  needs_labels: bool = False
  masks_padding: bool = False
  # (model config, prefix=, path=) -> the head's rules; prefix and path default to the
  # whole model's ("decode_head.", ("decode_head",)).
  reference_rules: Optional[Callable[..., list]] = None
  reference_dropped: tuple[str, ...] = ()
  mmseg_rules: Optional[Callable[..., list]] = None
  mmseg_dropped: tuple[str, ...] = ()


def _blocks(c, dtype) -> dict[str, Any]:
  """What every transformer decoder takes from the model config."""
  return dict(num_classes=c.num_classes, d_model=c.d_model, n_layers=c.n_layers,
              n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
              drop_path_rate=c.decoder_drop_path_rate, dtype=dtype,
              attention_impl=c.attention_impl)


def _reference(head_rules):
  """A reference head's rules from the model config; under OCE its class tokens are the
  backbone's, not the head's `cls_emb`."""
  return lambda c, **at: head_rules(c.n_layers, with_cls_emb=not c.oce, **at)


DECODERS: dict[str, DecoderSpec] = {spec.name: spec for spec in (
    DecoderSpec("mask_transformer", lambda c, dtype: MaskTransformer(**_blocks(c, dtype)),
                losses.segmenter_losses, masks_padding=True,
                reference_rules=_reference(rules.mask_transformer_rules),
                mmseg_rules=lambda c, **at: rules.mmseg_mask_head_rules(c.n_layers, **at),
                mmseg_dropped=rules.MMSEG_MASK_HEAD_DROPPED),
    DecoderSpec("linear", lambda c, dtype: LinearDecoder(num_classes=c.num_classes,
                                                         dtype=dtype),
                losses.segmenter_losses, masks_padding=True,
                reference_rules=lambda c, **at: rules.reference_linear_head_rules(**at),
                mmseg_rules=lambda c, **at: rules.mmseg_linear_head_rules(**at)),
    DecoderSpec("mlseg", lambda c, dtype: mlseg.MLSegHead(
        topk=c.topk, pool_grid=c.pool_grid, **_blocks(c, dtype)),
                losses.mlseg_losses, selects_topk=True, masks_padding=True,
                reference_rules=_reference(rules.mlseg_head_rules)),
    DecoderSpec("mlseg_trandec", lambda c, dtype: mlseg_ablations.MLSegAblationHead(
        classifier="trandec", topk=c.topk, pool_grid=c.pool_grid, **_blocks(c, dtype)),
                losses.mlseg_losses, selects_topk=True,
                # Its fixed sine table is a buffer we recompute.
                reference_rules=_reference(rules.trandec_head_rules),
                reference_dropped=rules.TRANDEC_DROPPED),
    DecoderSpec("mlseg_pooling", lambda c, dtype: mlseg_ablations.MLSegAblationHead(
        classifier="pooling", topk=c.topk, pool_grid=c.pool_grid, **_blocks(c, dtype)),
                losses.mlseg_losses, selects_topk=True,
                reference_rules=_reference(rules.pooling_head_rules)),
    DecoderSpec("mlseg_gt", lambda c, dtype: mlseg_gt.MLSegOracleHead(**_blocks(c, dtype)),
                losses.mlseg_losses, needs_labels=True,
                reference_rules=_reference(rules.gt_head_rules)),
)}


def decoder_spec(model_config: ml_collections.ConfigDict) -> DecoderSpec:
  """The spec of `model_config.decoder`, or a ValueError naming the field."""
  name = model_config.decoder
  if name not in DECODERS:
    raise ValueError(f"model.decoder={name!r} is not one of {sorted(DECODERS)}")
  return DECODERS[name]


def compute_losses(outputs, labels, model_config):
  """Total training loss and the scalars to log, for the decoder of `model_config`.

  outputs: the Segmenter's dict; labels: (B, H, W) int32 crops.
  """
  return decoder_spec(model_config).loss(outputs, labels, model_config)
