"""mlseg_jax.distributed: when a process joins a multi-host run, and a real 2-process run."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from mlseg_jax import distributed

REPO = Path(__file__).resolve().parents[1]

# Everything the detection reads; cleared so the host running the tests cannot leak in.
_LAUNCH_ENV = ("MLSEG_COORDINATOR", "MLSEG_NUM_PROCESSES", "MLSEG_PROCESS_ID",
               "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "MEGASCALE_NUM_SLICES",
               "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "GCE_METADATA_IP",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION")


@pytest.fixture
def calls(monkeypatch):
  """Clean launch environment; records what initialize() would do instead of doing it."""
  for name in _LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  recorded = []
  monkeypatch.setattr(distributed, "_use_cpu_collectives",
                      lambda: recorded.append(("cpu_collectives",)))
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: recorded.append(("initialize", kw)))
  return recorded


def _initialize_kwargs(coordinator=None, num=None, pid=None):
  return dict(coordinator_address=coordinator, num_processes=num, process_id=pid,
              local_device_ids=None)


def test_one_host_is_a_no_op(calls):
  assert distributed.initialize() is False
  assert calls == []


def test_explicit_environment_sets_cpu_collectives_before_initializing(calls, monkeypatch):
  monkeypatch.setenv("MLSEG_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("MLSEG_NUM_PROCESSES", "4")
  monkeypatch.setenv("MLSEG_PROCESS_ID", "3")
  distributed.initialize()
  assert calls == [("cpu_collectives",),
                   ("initialize", _initialize_kwargs("10.0.0.1:1234", 4, 3))]


def test_arguments_take_precedence_over_environment(calls, monkeypatch):
  monkeypatch.setenv("MLSEG_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("MLSEG_NUM_PROCESSES", "4")
  monkeypatch.setenv("MLSEG_PROCESS_ID", "3")
  distributed.initialize("host0:99", 2, 0, local_device_ids=[0, 1])
  assert calls[-1] == ("initialize", dict(coordinator_address="host0:99", num_processes=2,
                                          process_id=0, local_device_ids=[0, 1]))


def test_explicit_single_process_is_a_no_op(calls, monkeypatch):
  monkeypatch.setenv("MLSEG_NUM_PROCESSES", "1")
  assert distributed.initialize() is False
  assert calls == []


def test_incomplete_explicit_settings_name_what_is_missing(calls, monkeypatch):
  monkeypatch.setenv("MLSEG_COORDINATOR", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="MLSEG_NUM_PROCESSES.*MLSEG_PROCESS_ID"):
    distributed.initialize()
  assert calls == []


def test_non_integer_environment_names_the_variable(calls, monkeypatch):
  monkeypatch.setenv("MLSEG_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="MLSEG_NUM_PROCESSES='two'"):
    distributed.initialize()


def test_srun_step_with_several_tasks_lets_jax_read_slurm(calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  distributed.initialize()
  assert calls[-1] == ("initialize", _initialize_kwargs())
  # What launch/slurm_gpu.sbatch does: the coordinator given, count and id from SLURM.
  calls.clear()
  monkeypatch.setenv("MLSEG_COORDINATOR", "gpu001:61440")
  distributed.initialize()
  assert calls[-1] == ("initialize", _initialize_kwargs("gpu001:61440"))


def test_single_task_job_and_batch_step_stay_single_process(calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.initialize() is False
  # The batch script itself sees the job's task count but is one process, not an srun task.
  monkeypatch.setenv("SLURM_NTASKS", "16")
  monkeypatch.delenv("SLURM_STEP_ID")
  assert distributed.initialize() is False
  assert calls == []


def test_tpu_pod_hosts_from_environment(calls, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")
  assert distributed.initialize() is False
  assert calls == []
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
  distributed.initialize()
  assert calls[-1] == ("initialize", _initialize_kwargs())


@pytest.mark.parametrize("endpoints,multi_host", [
    ("t1v-n-0:0:10.130.0.2", False),
    ("t1v-n-0:0:10.130.0.2,t1v-n-1:1:10.130.0.3,t1v-n-2:2:10.130.0.4", True),
])
def test_tpu_vm_counts_workers_from_metadata_server(calls, monkeypatch, endpoints, multi_host):
  headers = []

  class Metadata(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # noqa: N802 (http.server's name)
      headers.append((self.path, self.headers.get("Metadata-Flavor")))
      body = endpoints.encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    distributed.initialize()
  finally:
    server.shutdown()
    server.server_close()
  assert headers == [("/computeMetadata/v1/instance/attributes/worker-network-endpoints",
                      "Google")]
  assert calls == ([("cpu_collectives",), ("initialize", _initialize_kwargs())]
                   if multi_host else [])


def test_single_process_helpers():
  assert distributed.is_main_process()
  distributed.sync("single_process_barrier")  # Returns at once with one process.


# A real multi-process run: 2 processes x 4 CPU devices, loopback coordinator, gloo.

def _worker():
  """One process of the 2-process run; prints its findings as one JSON line."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import jax.numpy as jnp

  assert distributed.initialize() is True
  pid = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # The global batch. (8, 3)
  local_rows = rows[4 * pid:4 * (pid + 1)]  # This host's slice of it. (4, 3)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_rows,
                                             rows.shape)
  replicated = NamedSharding(mesh, P())
  row_sums = jax.jit(lambda x: x.sum(axis=1), out_shardings=replicated)(x)  # (8,)
  total = jax.jit(jnp.sum, out_shardings=replicated)(x)
  psum_total = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), "data"), mesh=mesh,
                                     in_specs=P("data"), out_specs=P()))(x)
  distributed.sync("after_sums")
  print("RESULT " + json.dumps(dict(
      process_index=pid, process_count=jax.process_count(),
      device_count=jax.device_count(), local_device_count=jax.local_device_count(),
      mesh_processes=sorted({d.process_index for d in mesh.devices.flat}),
      main=distributed.is_main_process(), row_sums=np.asarray(row_sums).tolist(),
      total=float(total), psum_total=float(psum_total))), flush=True)
  # Both processes are past their last collective. Under load, JAX's exit-time teardown
  # of the distributed client can stall one process for minutes (about 1 run in 25 on 2
  # busy cores); that teardown is not under test here.
  os._exit(0)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(port, process_id):
  env = {k: v for k, v in os.environ.items()
         if k not in _LAUNCH_ENV and "proxy" not in k.lower()}  # gRPC must not proxy loopback.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]),
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
             MLSEG_COORDINATOR=f"127.0.0.1:{port}", MLSEG_NUM_PROCESSES="2",
             MLSEG_PROCESS_ID=str(process_id))
  return env


def test_two_processes_of_four_cpu_devices_form_one_global_mesh():
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, __file__, "worker"], cwd=REPO,
                              env=_worker_env(port, i), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for w in workers:
      outputs.append(w.communicate(timeout=120)[0])
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.wait()
  results = []
  for i, (w, out) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f"process {i} failed:\n{out}"
    # stderr shares the pipe: gloo's own messages may land on the RESULT line, before or
    # after it (each write is atomic), so decode the one JSON object after the marker.
    assert "RESULT " in out, f"process {i} printed no result:\n{out}"
    results.append(json.JSONDecoder().raw_decode(out, out.index("RESULT ") + 7)[0])

  rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  for i, r in enumerate(results):
    assert r["process_index"] == i
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
    assert r["mesh_processes"] == [0, 1]
    assert r["main"] == (i == 0)
    # Rows 4..7 exist only in process 1: seeing them in process 0 proves the exchange.
    np.testing.assert_array_equal(r["row_sums"], rows.sum(axis=1))
    assert r["total"] == r["psum_total"] == rows.sum()


if __name__ == "__main__":
  if sys.argv[1:] == ["worker"]:
    _worker()
  else:
    sys.exit(f"usage: {sys.argv[0]} worker  (one process of the 2-process test)")
