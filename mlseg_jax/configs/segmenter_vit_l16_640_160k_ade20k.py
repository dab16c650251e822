"""REFERENCE.md §7: segmenter_vit_l16_640_160k_ade20k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='ade20k',
      backbone='L/16',
      crop=640,
      iters=160_000,
      decoder='mask_transformer',
      miou_ss=52.0,
      miou_ms=53.6,
      arg=arg,
  )
