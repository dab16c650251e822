"""Test setup: 8 CPU devices for the sharded paths, tiny model configs, and one trained
quickstart workdir for the command-line tests that need one."""

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
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


# The files that take longest on the 2-core CI machine (--durations), longest first: the
# xdist workers (`--dist loadfile`) are handed these before the rest, so that no long file
# is left to run alone at the end (xdist's own order, by test count, hands them out last).
LONGEST_FILES = (
    "test_preemption.py", "test_train.py", "test_filesystem_faults.py", "test_gcs.py",
    "test_preemption_pod.py", "test_main.py", "test_eval_reference.py", "test_multiprocess.py",
    "test_evaluate.py", "test_bench.py", "test_padded_windows.py", "test_modes.py",
    "test_topology.py", "test_configs.py", "test_notebook.py", "test_launch.py",
    "test_segmenter.py", "test_convert.py", "test_aot.py", "test_user_mistakes.py",
    "test_export.py", "test_compilation.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order made below.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


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


# ---------------------------------------------------------------------------------------
# The command line, and one trained quickstart workdir.

# The quickstart shrunk to seconds on a CPU: what the command-line tests train.
TINY = ["--config.model.backbone_depth=2", "--config.data.crop_size=(64,64)",
        "--config.data.img_scale=(120,90)", "--config.data.test_scale=(120,90)",
        "--config.eval.stride=(64,64)", "--config.eval.max_images=4",
        "--config.train.log_every=3", "--config.train.checkpoint_every=3"]
QUICKSTART_STEPS = 3
# The training of `trained_quickstart`, but for its --workdir and its compilation cache.
QUICKSTART_TRAINING = ["--config", "configs/quickstart.py", *TINY,
                       f"--config.train.total_steps={QUICKSTART_STEPS}",
                       f"--config.train.eval_every={QUICKSTART_STEPS}"]


def assert_user_error(proc, *needles, max_lines=6):
  """A user mistake: exit code 2, a short `error:` message naming it, no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if not line.startswith(("I", "W"))]
  assert errors and errors[0].startswith("error: "), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and len(errors) <= max_lines, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def run_main(*args, check=True):
  """`python -m mlseg_jax.main ARGS` in the repository, on 2 CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "mlseg_jax.main", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@dataclasses.dataclass(frozen=True)
class TrainedQuickstart:
  workdir: Path  # Checkpoint QUICKSTART_STEPS, its evaluation, TensorBoard, config.json.
  cache: Path  # The compilation cache the training started empty and filled.
  stderr: str  # The training's log.

  def copy_to(self, path: Path) -> Path:
    """A copy of the workdir, for a test that writes into it (an evaluation does)."""
    shutil.copytree(self.workdir, path)
    return path


def _code_and_command_key() -> str:
  """What the trained workdir depends on: the package's files, the command and the
  versions of the libraries that compile and save it."""
  digest = hashlib.sha256(repr(QUICKSTART_TRAINING).encode())
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
    digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
  for path in sorted((REPO / "mlseg_jax").rglob("*")):
    if path.is_file() and "__pycache__" not in path.parts:
      digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
  return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_quickstart(request, tmp_path_factory) -> TrainedQuickstart:
  """QUICKSTART_TRAINING run by the command line, as users run it (a workdir relative to
  the repository), with a compilation cache of its own that it starts empty.

  Trained once for every test process (the first one to ask trains it, under a lock,
  while the others wait) and kept under the pytest cache, keyed by the code and the
  command, for the next session (one unused for a day is removed). Tests that write into
  the workdir use `copy_to`.
  """
  cache = getattr(request.config, "cache", None)
  root = (cache.mkdir("trained_quickstart") if cache is not None
          else tmp_path_factory.getbasetemp().parent / "trained_quickstart")
  root.mkdir(parents=True, exist_ok=True)
  here = root / _code_and_command_key()
  run = TrainedQuickstart(here / "workdir", here / "compilation_cache", "")
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    for stale in root.iterdir():
      if stale.is_dir() and stale != here and time.time() - stale.stat().st_mtime > 86400:
        shutil.rmtree(stale, ignore_errors=True)
    if not (here / "stderr.txt").exists():  # Written last: the run is complete.
      shutil.rmtree(here, ignore_errors=True)
      proc = run_main(*QUICKSTART_TRAINING, "--workdir", os.path.relpath(run.workdir, REPO),
                      f"--config.compilation_cache={run.cache}")
      (here / "stderr.txt").write_text(proc.stderr)
    os.utime(here)  # Used now.
  return dataclasses.replace(run, stderr=(here / "stderr.txt").read_text())
