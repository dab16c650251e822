"""REFERENCE.md §7: segmenter_mlseg_gt_vit_b16_512_320k_coco_lvis."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_lvis',
      backbone='B/16',
      crop=512,
      iters=320_000,
      decoder='mlseg_gt',
      weight_decay=1e-06,
      head_decay_mult=100.0,
      miou_ss=46.8,
      arg=arg,
  )
