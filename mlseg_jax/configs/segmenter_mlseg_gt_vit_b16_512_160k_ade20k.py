"""REFERENCE.md §7: segmenter_mlseg_gt_vit_b16_512_160k_ade20k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='ade20k',
      backbone='B/16',
      crop=512,
      iters=160_000,
      decoder='mlseg_gt',
      weight_decay=1e-06,
      head_decay_mult=100.0,
      miou_ss=63.6,
      arg=arg,
  )
