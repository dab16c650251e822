"""`pip install .`: the built wheel holds the configs and the bundled quickstart data, and
the README's commands find them from any directory."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from mlseg_jax import configs
from mlseg_jax.data.datasets import QUICKSTART_DATA


def _pip(*args, cwd):
  run = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(the wheel, the folder it was installed into): built from the checkout, no network."""
  root = tmp_path_factory.mktemp("package")
  # The checkout's files as git sees them, copied: the build writes build/ and egg-info
  # beside its sources, and must not see caches or a venv.
  listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                           "--exclude-standard"], check=True, capture_output=True).stdout
  src = root / "src"
  for name in filter(None, listed.decode().split("\0")):
    if (REPO / name).is_file() and not (REPO / name).is_symlink():
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(REPO / name, src / name)
  _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(src),
       cwd=root)
  (wheel,) = (root / "dist").glob("mlseg_jax-*.whl")
  _pip("install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel), cwd=root)
  return wheel, root / "site"


def _bundled_files():
  root = pathlib.Path(QUICKSTART_DATA)
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_wheel_holds_every_config_and_the_quickstart_data(installed):
  wheel, _ = installed
  names = set(zipfile.ZipFile(wheel).namelist())
  for name in configs.names():
    assert f"mlseg_jax/configs/{name}.py" in names
  data = sorted(n.removeprefix("mlseg_jax/assets/camvid_subset/") for n in names
                if n.startswith("mlseg_jax/assets/camvid_subset/"))
  assert data == _bundled_files() and len(data) == 2 * (32 + 16) + 1


def _run_installed(site, cwd, *args):
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_readme_commands_find_the_packaged_configs_and_data(installed, tmp_path):
  _, site = installed
  where = _run_installed(site, tmp_path, "-c", "import mlseg_jax, mlseg_jax.configs as c; "
                         "from mlseg_jax.configs import quickstart; "
                         "print(mlseg_jax.__file__); print(quickstart.get_config().data.root)")
  assert where.returncode == 0, where.stderr[-3000:]
  module, root = where.stdout.split()
  assert module.startswith(str(site)) and root.startswith(str(site))
  # The README's spelling (configs/NAME.py) and the bare name, from a folder without configs/.
  for spelling in ("configs/quickstart.py", "quickstart"):
    check = _run_installed(site, tmp_path, "-m", "mlseg_jax.data.check", "--config", spelling)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "every file is good" in check.stdout and "32 " in check.stdout
  missing = _run_installed(site, tmp_path, "-m", "mlseg_jax.data.check",
                           "--config", "configs/no_such_row.py")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
      "error: --config: [Errno 2] No such file or directory: 'configs/no_such_row.py'")
