"""REFERENCE.md §7: segmenter_vit_b16_512_160k_ade20k_full."""

from configs.common import paper_row


def get_config():
  return paper_row(
      dataset='ade20k_full',
      backbone='B/16',
      crop=512,
      iters=160_000,
      decoder='mask_transformer',
      miou_ss=17.8,
  )
