"""REFERENCE.md §7: segmenter_mlseg_pooling_vit_b16_512_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='B/16',
      crop=512,
      iters=40_000,
      decoder='mlseg_pooling',
      topk=50,
      pool_grid=16,
      img_loss='asl',
      gamma_neg=0.0,
      gamma_pos=0.0,
      img_loss_weight=10.0,
      miou_ss=43.2,
      arg=arg,
  )
