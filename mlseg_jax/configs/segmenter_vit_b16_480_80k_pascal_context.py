"""REFERENCE.md §7: segmenter_vit_b16_480_80k_pascal_context."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='pascal_context',
      backbone='B/16',
      crop=480,
      iters=80_000,
      decoder='mask_transformer',
      miou_ss=53.8,
      miou_ms=54.6,
      arg=arg,
  )
