"""REFERENCE.md §7: segmenter_mlseg_gt_vit_b16_480_80k_pascal_context."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='pascal_context',
      backbone='B/16',
      crop=480,
      iters=80_000,
      decoder='mlseg_gt',
      miou_ss=70.8,
      arg=arg,
  )
