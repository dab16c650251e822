"""REFERENCE.md §7: segmenter_mlseg_vit_b16_512_40k_coco_stuff10k."""

from mlseg_jax.configs.common import paper_row


def get_config(arg=None):
  return paper_row(
      dataset='coco_stuff10k',
      backbone='B/16',
      crop=512,
      iters=40_000,
      decoder='mlseg',
      n_layers=3,
      topk=50,
      img_loss='bce',
      img_loss_weight=10.0,
      miou_ss=44.9,
      miou_ms=46.2,
      arg=arg,
  )
