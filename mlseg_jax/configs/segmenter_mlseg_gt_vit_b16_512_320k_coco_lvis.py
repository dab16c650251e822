"""REFERENCE.md §7: segmenter_mlseg_gt_vit_b16_512_320k_coco_lvis.

No weight decay: the reference's segmenter-ori_mlseg_gt_vit-b16_512x512_320k_lvis.py has
weight_decay=0.0 and custom keys only for pos_embed, cls_token and norm.
"""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_lvis',
      backbone='B/16',
      crop=512,
      iters=320_000,
      decoder='mlseg_gt',
      miou_ss=46.8,
      arg=arg,
  )
