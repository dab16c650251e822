"""REFERENCE.md §7: segmenter_oce_vit_b16_512_160k_ade20k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='ade20k',
      backbone='B/16',
      crop=512,
      iters=160_000,
      decoder='mask_transformer',
      oce=True,
      miou_ss=48.8,
      arg=arg,
  )
