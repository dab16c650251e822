"""REFERENCE.md §7: segmenter_vit_b16_512_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='B/16',
      crop=512,
      iters=40_000,
      decoder='mask_transformer',
      miou_ss=41.9,
      miou_ms=43.8,
      arg=arg,
  )
