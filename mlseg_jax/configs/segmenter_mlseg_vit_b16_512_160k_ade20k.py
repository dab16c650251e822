"""REFERENCE.md §7: segmenter_mlseg_vit_b16_512_160k_ade20k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='ade20k',
      backbone='B/16',
      crop=512,
      iters=160_000,
      decoder='mlseg',
      n_layers=3,
      topk=50,
      img_loss='asl',
      gamma_neg=2.0,
      gamma_pos=0.0,
      img_loss_weight=10.0,
      weight_decay=1e-06,
      head_decay_mult=100.0,
      miou_ss=49.7,
      miou_ms=51.4,
      arg=arg,
  )
