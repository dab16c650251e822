"""REFERENCE.md §7: segmenter_mlseg_vit_l16_640_160k_ade20k."""

from configs.common import paper_row


def get_config():
  return paper_row(
      dataset='ade20k',
      backbone='L/16',
      crop=640,
      iters=160_000,
      decoder='mlseg',
      topk=50,
      img_loss='asl',
      gamma_neg=2.0,
      gamma_pos=0.0,
      img_loss_weight=10.0,
      weight_decay=1e-06,
      miou_ss=52.6,
      miou_ms=54.4,
  )
