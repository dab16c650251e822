"""REFERENCE.md §7: segmenter_vit_b16_512_80k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='B/16',
      crop=512,
      iters=80_000,
      decoder='mask_transformer',
      miou_ss=43.4,
      miou_ms=45.2,
      arg=arg,
  )
