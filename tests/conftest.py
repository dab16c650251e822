"""Test setup: 8 CPU devices for the sharded paths, tiny model configs."""

import os
import sys
from pathlib import Path

# Must precede the first jax import: gives the CPU backend 8 devices for mesh tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests build the same small programs many times (every train() call compiles its init
# and step); a persistent cache shared by the test processes compiles each once.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_model_config(decoder="mask_transformer", num_classes=5, **overrides):
  """ViT width 64, depth 2, 4 heads, patch 16, decoder width 64: fast on a CPU."""
  from mlseg_jax.models.segmenter import default_model_config

  c = default_model_config()
  c.num_classes = num_classes
  c.backbone = "B/16"
  c.backbone_width = 64
  c.backbone_depth = 2
  c.backbone_heads = 4
  c.img_size = (64, 64)
  c.decoder = decoder
  c.d_model = 64
  c.n_heads = 4
  c.d_ff = 256
  c.oce_start_layer = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture
def tiny_config():
  return tiny_model_config
