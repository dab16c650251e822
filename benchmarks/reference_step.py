r"""The reference's training step, for `benchmarks/step_vs_reference.py` (never in CI).

  REFERENCE_PYTHON benchmarks/reference_step.py RANKSEG/mmseg CONFIG.py DATA.npz THREADS

Runs under an interpreter with torch, timm and mmcv 1.4.0 (REFERENCE's recipe: mmcv.ops and
the SSN extension are C++ modules this step never calls, so they are stubbed), builds the
RankSeg config's segmentor and optimizer from scratch (no pretrained weights: they do not
change the speed), and times `forward_train` + backward + the optimizer step on the
images and labels of DATA.npz. Reads a count N per line on stdin, runs N steps and prints
their seconds as one JSON line; prints READY once built. Imports nothing of ours.
"""

import json
import sys
import time
import types


def _stub(name):
  module = types.ModuleType(name)

  def missing(attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return type(attr, (), {})

  module.__getattr__ = missing
  sys.modules[name] = module


def main(root, config_path, data_path, threads):
  sys.path.insert(0, root)
  for name in ("mmcv.ops", "mmseg.ops.ssn.lib.ssn.pair_wise_distance"):
    _stub(name)
  import numpy as np
  import torch
  from mmcv import Config
  from mmcv.runner import build_optimizer
  from mmseg.models import build_segmentor

  torch.set_num_threads(threads)
  cfg = Config.fromfile(config_path)
  cfg.model.pretrained = None
  cfg.model.backbone.init_cfg = None

  def no_sync_bn(d):  # SyncBN needs a process group; one process has none.
    for v in d.values() if isinstance(d, dict) else ():
      if isinstance(v, dict) and v.get("type") == "SyncBN":
        v["type"] = "BN"
      no_sync_bn(v)

  no_sync_bn(cfg.model)
  model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"),
                          test_cfg=cfg.get("test_cfg"))
  model.init_weights()
  model.train()
  optimizer = build_optimizer(model, cfg.optimizer)
  data = np.load(data_path)
  img = torch.from_numpy(np.ascontiguousarray(data["image"].transpose(0, 3, 1, 2)))
  gt = torch.from_numpy(data["label"][:, None].astype(np.int64))
  h, w = img.shape[2:]
  metas = [dict(img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False)
           for _ in range(img.shape[0])]

  def step():
    losses = model(img=img, img_metas=metas, gt_semantic_seg=gt)
    loss, _ = model._parse_losses(losses)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  print("READY", flush=True)
  for line in sys.stdin:
    seconds = []
    for _ in range(int(line)):
      start = time.perf_counter()
      step()
      seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
