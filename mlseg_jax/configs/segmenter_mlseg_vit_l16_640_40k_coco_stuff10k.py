"""REFERENCE.md §7: segmenter_mlseg_vit_l16_640_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='L/16',
      crop=640,
      iters=40_000,
      decoder='mlseg',
      n_layers=3,
      topk=50,
      img_loss='asl',
      gamma_neg=2.0,
      gamma_pos=0.0,
      img_loss_weight=10.0,
      miou_ss=46.7,
      miou_ms=47.9,
      arg=arg,
  )
