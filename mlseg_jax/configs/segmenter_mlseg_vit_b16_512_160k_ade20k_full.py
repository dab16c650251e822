"""REFERENCE.md §7: segmenter_mlseg_vit_b16_512_160k_ade20k_full."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='ade20k_full',
      backbone='B/16',
      crop=512,
      iters=160_000,
      decoder='mlseg',
      n_layers=3,
      topk=100,
      pool_grid=0,
      img_loss='asl',
      gamma_neg=2.0,
      gamma_pos=0.0,
      img_loss_weight=100.0,
      miou_ss=18.8,
      arg=arg,
  )
