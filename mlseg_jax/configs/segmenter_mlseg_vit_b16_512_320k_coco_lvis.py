"""REFERENCE.md §7: segmenter_mlseg_vit_b16_512_320k_coco_lvis."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_lvis',
      backbone='B/16',
      crop=512,
      iters=320_000,
      decoder='mlseg',
      n_layers=3,
      topk=100,
      pool_grid=0,
      img_loss='asl',
      gamma_neg=2.0,
      gamma_pos=0.0,
      img_loss_weight=300.0,
      weight_decay=1e-06,
      head_decay_mult=100.0,
      miou_ss=21.3,
      arg=arg,
  )
