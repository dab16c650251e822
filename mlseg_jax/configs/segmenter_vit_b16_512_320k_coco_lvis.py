"""REFERENCE.md §7: segmenter_vit_b16_512_320k_coco_lvis."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_lvis',
      backbone='B/16',
      crop=512,
      iters=320_000,
      decoder='mask_transformer',
      miou_ss=19.4,
      arg=arg,
  )
