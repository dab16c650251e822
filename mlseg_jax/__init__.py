"""mlseg_jax: Segmenter + MLSeg (multi-label top-k classification) in JAX/Flax."""

# One ignore value inside the whole pipeline, whatever the dataset writes on disk
# (255 for ADE20K/COCO-Stuff/Pascal, -1 for ADE20K-Full/COCO+LVIS). 255 cannot serve:
# it is a real class id for the 847- and 1284-class datasets.
IGNORE_LABEL = -1


def __getattr__(name):
  # The Python API, imported on first use: importing the package must not import JAX
  # (main.py installs its signal handlers first).
  if name in ("Segmenter", "Prediction"):
    from mlseg_jax import api

    return getattr(api, name)
  raise AttributeError(f"module 'mlseg_jax' has no attribute {name!r}")
