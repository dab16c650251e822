"""Joining a multi-host run: JAX's own multi-controller runtime, started only when needed.

Every host runs the same program. `initialize()` must come before anything touches a JAX
device; it calls `jax.distributed.initialize()` when the environment says this is one process
of many and does nothing on one host, so the same command runs on a laptop, a TPU pod and a
SLURM cluster:

  - explicit: arguments, or MLSEG_COORDINATOR / MLSEG_NUM_PROCESSES / MLSEG_PROCESS_ID
    (what the CPU multi-process test and hand-made launchers use);
  - SLURM: inside an `srun` step with more than one task; JAX reads the coordinator, the
    process count and id from SLURM itself (launch/slurm_gpu.sbatch sets MLSEG_COORDINATOR);
  - TPU pod slice or multislice: more than one TPU worker; JAX reads the rest from the TPU
    environment or the VM metadata.

After it, process 0 alone writes logs and TensorBoard (`is_main_process`), every process takes
part in checkpoint saves (Orbax coordinates them) and `sync(name)` is a named barrier.
"""

import glob
import itertools
import os
import urllib.error
import urllib.request

import jax
from absl import logging
from jax._src import distributed as jax_distributed  # Its coordination client: no public name.
from jax.experimental import multihost_utils

COORDINATOR_ENV = "MLSEG_COORDINATOR"
NUM_PROCESSES_ENV = "MLSEG_NUM_PROCESSES"
PROCESS_ID_ENV = "MLSEG_PROCESS_ID"

# Google's PCI vendor id: TPU chips attached to this VM (what JAX itself looks for).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_METADATA_URL = ("http://{host}/computeMetadata/v1/instance/attributes/"
                     "worker-network-endpoints")


def _env_int(name):
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_process_count():
  """Tasks in this `srun` step, or None outside one."""
  # SLURM_STEP_ID tells a task started by srun from the batch script itself, which also sees
  # the job's SLURM_NTASKS but is a single process: initialising there would wait forever.
  if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
    return None
  return _env_int("SLURM_NTASKS")


def _on_cloud_tpu_vm():
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _tpu_worker_endpoints_from_metadata():
  """The slice's worker list from the TPU VM metadata server (None if unreachable)."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(_TPU_METADATA_URL.format(host=host),
                                   headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read().decode()
  except (urllib.error.URLError, OSError) as e:
    logging.warning("TPU VM metadata server unreachable (%s)", e)
    return None


def _tpu_process_count():
  """Processes of this TPU run: 1 off TPUs or on one host, None when a TPU VM cannot tell."""
  num_slices = _env_int("MEGASCALE_NUM_SLICES") or 1
  # GKE and some TPU images put the slice's hosts in the environment.
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  if hosts:
    return num_slices * len([h for h in hosts.split(",") if h.strip()])
  if num_slices > 1:
    return None  # Multislice: JAX reads the hosts per slice from the metadata.
  # JAX sets TPU_SKIP_MDS_QUERY when it found no TPU chip at import: no metadata to ask.
  if os.environ.get("TPU_SKIP_MDS_QUERY") is not None or not _on_cloud_tpu_vm():
    return 1
  endpoints = _tpu_worker_endpoints_from_metadata()
  if endpoints is None:
    return None
  return len([e for e in endpoints.split(",") if e.strip()])


def _use_cpu_collectives():
  """Cross-process collectives for CPU devices (the CPU test runs; harmless on GPU/TPU)."""
  if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    return  # The user chose one (e.g. mpi); JAX reads it from the environment.
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    # Older JAX spelled it as a switch; a JAX without either has gloo built in by default.
    try:
      jax.config.update("jax_cpu_enable_gloo_collectives", True)
    except AttributeError:
      logging.info("no CPU collectives option in jax %s; using its default", jax.__version__)


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None):
  """Joins the multi-host run the environment describes; a no-op on one host.

  Args:
    coordinator_address: "host:port" of process 0 (default: $MLSEG_COORDINATOR, or what
      SLURM / the TPU environment say).
    num_processes: processes in the run (default: $MLSEG_NUM_PROCESSES, or SLURM / TPU).
    process_id: this process, 0..num_processes-1 (default: $MLSEG_PROCESS_ID, or SLURM / TPU).
    local_device_ids: accelerators this process drives (default: JAX's choice: one GPU per
      process under SLURM, unless $JAX_LOCAL_DEVICE_IDS lists several; all TPU chips).

  Returns:
    True when this process is now one of several, False on one host.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
  if num_processes is None:
    num_processes = _env_int(NUM_PROCESSES_ENV)
  if process_id is None:
    process_id = _env_int(PROCESS_ID_ENV)

  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  slurm_count = _slurm_process_count()
  in_slurm = slurm_count is not None and slurm_count > 1
  if explicit:
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
      if process_id not in (None, 0):
        raise ValueError(f"process_id={process_id} with num_processes=1")
      return False
    missing = [f"{arg} (or ${env})" for arg, env, value in (
        ("coordinator_address", COORDINATOR_ENV, coordinator_address),
        ("num_processes", NUM_PROCESSES_ENV, num_processes),
        ("process_id", PROCESS_ID_ENV, process_id)) if value is None]
    # Under srun JAX fills in what is missing from SLURM's variables; elsewhere nothing can.
    if missing and not in_slurm:
      raise ValueError("a multi-process run needs coordinator_address, num_processes and "
                       f"process_id; missing: {', '.join(missing)}")
    source = "explicit coordinator"
  elif in_slurm:
    source = f"SLURM ({slurm_count} tasks)"
  else:
    tpu_count = _tpu_process_count()
    if tpu_count == 1:
      return False
    # A TPU VM whose metadata cannot be read: JAX's own detection is the better judge, and
    # initialising a single host costs nothing.
    source = f"TPU ({tpu_count or 'unknown number of'} hosts)"

  _use_cpu_collectives()
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("jax.distributed from %s: process %d of %d, %d local / %d global devices",
               source, jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


def is_main_process():
  """Process 0 writes logs, TensorBoard and other single-writer files."""
  return jax.process_index() == 0


def align(name: str, timeout_s: float = 900) -> None:
  """Blocks until every process reaches `name`, waiting up to `timeout_s`.

  Before a program's first cross-process collective: on CPU, gloo gives a new group of
  processes 30 s to meet, and one process may still be compiling minutes after another
  (a loaded host). The coordination service's barrier waits as long as we say; a process
  that died fails it at once. Falls back to `sync` where JAX does not expose it."""
  if jax.process_count() == 1:
    return
  client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
  if client is None or not hasattr(client, "wait_at_barrier"):
    sync(name)
    return
  # Every process calls in the same order: the count makes each barrier's id new.
  client.wait_at_barrier(f"mlseg_jax/{next(_barrier_ids)}/{name}", int(timeout_s * 1000))


_barrier_ids = itertools.count(1)


def sync(name):
  """Blocks until every process reaches the barrier `name` (same name on all processes)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
