"""REFERENCE.md §7: segmenter_mlseg_gt_vit_b16_512_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='B/16',
      crop=512,
      iters=40_000,
      decoder='mlseg_gt',
      miou_ss=66.8,
      arg=arg,
  )
