"""REFERENCE.md §7: segmenter_vit_l16_640_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='L/16',
      crop=640,
      iters=40_000,
      decoder='mask_transformer',
      miou_ss=45.5,
      miou_ms=47.1,
      arg=arg,
  )
