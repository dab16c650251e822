r"""Ahead-of-time compilation for a TPU slice, on any machine: does a config fit, how fast can
it be, and how long does it compile, before the slice is booked.

  python -m mlseg_jax.aot --config segmenter_mlseg_vit_b16_512_160k_ade20k --topology v5e-8

PyPI's libtpu (`pip install "jax[tpu]"`) compiles for a TPU topology with no TPU present
(`jax.experimental.topologies`): the executables, their memory and cost analyses are the
real ones; nothing runs. The programs are the ones a run of the config executes, built by
the same functions: the training step (`train.make_train_step` over the config's mesh,
sharding rules, remat and dtype, at `train.batch_size` or `--batch`) and every evaluation
forward (`evaluation.evaluators.make_predict_fn`) that the config's evaluators call for images of
`--sizes`, one per window shape and call size (`runner.forward_calls`).

Per program the table gives the compile seconds, GFLOP per chip, HBM per chip (arguments,
outputs less the donated ones, temporaries, total) against the chip's, the collectives in
the HLO with their bytes, and a roofline lower bound on its time: the larger of FLOPs over
the chip's peak bf16 rate and bytes accessed over its HBM bandwidth (`CHIPS`, published
figures), with the MFU that bound allows (collectives and their overlap are not in it).

Slices are named as Cloud TPU names them: v4-8 and v5p-8 count TensorCores (4 chips, one
JAX device per chip: megacore), v5e-8 (or v5litepod-8) and v6e-8 count chips; v5e-32,
v4-32 and the like span several hosts. libtpu's own topology strings (`v5e:2x4`) work too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import time
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

from mlseg_jax import errors



@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation (Cloud TPU's system architecture)."""
  generation: str
  bf16_tflops: float  # peak dense bf16 matmul rate per chip
  hbm_gib: float
  hbm_gbps: float  # HBM bandwidth, GB/s
  counts_cores: bool  # the slice name counts TensorCores (2 per chip), not chips
  dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
  single_host_chips: int  # the most chips on one host; bigger slices have hosts of 4


CHIPS = {c.generation: c for c in (
    Chip("v4", 275.0, 32.0, 1228.0, counts_cores=True, dims=3, single_host_chips=4),
    Chip("v5e", 197.0, 16.0, 819.0, counts_cores=False, dims=2, single_host_chips=8),
    Chip("v5p", 459.0, 95.0, 2765.0, counts_cores=True, dims=3, single_host_chips=4),
    Chip("v6e", 918.0, 32.0, 1640.0, counts_cores=False, dims=2, single_host_chips=8),
)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    """libtpu's name of the topology (`v5e:2x4`)."""
    return f"{self.chip.generation}:" + "x".join(map(str, self.shape))

  @property
  def host_shape(self) -> tuple[int, ...]:
    if self.chips <= self.chip.single_host_chips:
      return self.shape + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  @property
  def cloud_name(self) -> str:
    """Cloud TPU's accelerator type: v5litepod-8, v4-8 (TensorCores), v6e-8, ..."""
    n = self.chips * (2 if self.chip.counts_cores else 1)
    return f"{'v5litepod' if self.chip.generation == 'v5e' else self.chip.generation}-{n}"

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.host_shape)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """The shape Cloud TPU gives a slice of `chips` chips: 4 -> 2x2 (2x2x1), 8 -> 2x4
  (2x2x2), 32 -> 4x8 (2x4x4); the smallest axes grow first."""
  if dims == 2:
    shape = [1, 1]
    while math.prod(shape) < chips:
      shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape))
  shape = [1, 1, 1]
  while math.prod(shape) < chips:
    shape[shape.index(min(shape))] *= 2
  shape = sorted(shape)
  return tuple(shape[1:] + shape[:1]) if shape[0] == 1 else tuple(shape)


def parse_slice(name: str) -> Slice:
  """`v5e-8`, `v5litepod-16`, `v4-32`, `v5p-8`, `v6e-8` or `v5e:2x4`; a UserError for
  anything else."""
  known = ", ".join(sorted(CHIPS))
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.strip().lower())
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise errors.UsageError(f"--topology={name}: unknown TPU generation {m.group(1)!r} "
                              f"(known: {known})")
    shape = tuple(int(v) for v in m.group(2).split("x"))
    if len(shape) != CHIPS[gen].dims or min(shape) < 1:
      raise errors.UsageError(f"--topology={name}: {gen} topologies have {CHIPS[gen].dims} "
                              f"axes, e.g. {Slice(gen, CHIPS[gen], _torus(8, CHIPS[gen].dims)).topology}")
    return Slice(name, CHIPS[gen], shape)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  if not m or _ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
    raise errors.UsageError(f"--topology={name!r} is not a TPU slice: write e.g. v5e-8, "
                            f"v4-8, v5p-8, v6e-8, v5e-32 or v5e:2x4 (generations: {known})")
  chip = CHIPS[_ALIASES.get(m.group(1), m.group(1))]
  n = int(m.group(2))
  chips = n // 2 if chip.counts_cores else n
  unit = "TensorCores (2 per chip)" if chip.counts_cores else "chips"
  if n < 1 or (chip.counts_cores and n % 2) or chips & (chips - 1):
    raise errors.UsageError(f"--topology={name}: a {chip.generation} slice counts {unit}, "
                            "a power of two" + (" of at least 2" if chip.counts_cores else ""))
  return Slice(name, chip, _torus(chips, chip.dims))


def slice_devices(s: Slice) -> list:
  """The slice's compile-only devices: one per chip (v4 as megacore, as JAX shows it)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise errors.UsageError("compiling for a TPU needs libtpu: pip install "
                            "\"jax[tpu]==$(python -c 'import jax; print(jax.__version__)')\"")
  from jax.experimental import topologies

  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    # No TPU here: nothing to share, so any number of processes may load libtpu (it takes
    # a machine-wide lock otherwise), and libtpu is told the slice instead of asking the
    # metadata server of a TPU VM this is not.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.cloud_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  kwargs = dict(chips_per_host_bounds=s.host_shape)
  if s.chip.generation == "v4":
    kwargs["chip_config_name"] = "megacore"
  devices = topologies.get_topology_desc(s.topology, "tpu", **kwargs).devices
  if len(devices) != s.chips:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {s.topology}, expected "
                       f"{s.chips} (one per chip)")
  return devices


# ---------------------------------------------------------------------------------------
# One compiled program and what XLA says about it.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_COLLECTIVE_RE = re.compile(
    r"^\s*\S+ = (.*?) (" + "|".join(_COLLECTIVES) + r")(-start)?\(", re.MULTILINE)
_SHAPE_RE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _SHAPE_RE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append(n * _DTYPE_BYTES.get(dtype, 4))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in an optimised HLO module (the result
  bytes of each; an async start counts once, its done not at all)."""
  found: dict[str, dict[str, int]] = {}
  for shape, op, start in _COLLECTIVE_RE.findall(hlo_text):
    sizes = _shape_bytes(shape)
    if start and op in ("all-gather", "collective-permute") and len(sizes) > 1:
      sizes = [sizes[1]]  # (operand, result, ...) of the async form
    entry = found.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += sum(sizes)
  return found


# The TPU compiler's two ways of saying a program does not fit: the whole program's use,
# or (caught earlier, so sooner) its temporaries' alone.
_OOM_RE = re.compile(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm", re.IGNORECASE)
_OOM_TEMP_RE = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)", re.IGNORECASE)
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _bytes(m: re.Match) -> int:
  return int(float(m.group(1)) * _UNIT[m.group(2).upper()])


def argument_bytes(args: Sequence[Any]) -> int:
  """HBM per chip the arguments take: each leaf's shard on one device."""
  import jax
  import numpy as np

  def per_chip(a) -> int:
    sharding = getattr(a, "sharding", None)
    shape = sharding.shard_shape(a.shape) if sharding is not None else a.shape
    return math.prod(shape) * np.dtype(a.dtype).itemsize

  return sum(per_chip(a) for a in jax.tree_util.tree_leaves(args))


@dataclasses.dataclass
class Program:
  """One compiled program on one chip."""
  name: str
  compile_s: float
  fits: bool
  calls: int = 1  # calls per evaluation (evaluation forwards)
  flops: float = 0.0
  bytes_accessed: float = 0.0
  arguments: int = 0
  outputs: int = 0  # less what aliases (donated) arguments
  temporaries: int = 0
  total: int = 0  # arguments + outputs + temporaries + generated code
  collectives: dict = dataclasses.field(default_factory=dict)
  error: str = ""

  def roofline(self, chip: Chip) -> tuple[float, float]:
    """(lower bound on the time in seconds, the MFU that bound allows)."""
    compute = self.flops / (chip.bf16_tflops * 1e12)
    memory = self.bytes_accessed / (chip.hbm_gbps * 1e9)
    bound = max(compute, memory)
    return bound, (compute / bound if bound else 0.0)


@contextlib.contextmanager
def _no_persistent_cache():
  """Compile seconds are what this measures, and a TPU executable written to a persistent
  cache (the process's, or JAX_COMPILATION_CACHE_DIR) cannot be read back without a TPU:
  each later compile would warn that the entry is unreadable, and compile anyway."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  # A process decides once whether it uses the cache: reset, the setting is read again.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def compile_program(name: str, jitted, args: Sequence[Any], chip: Chip) -> Program:
  """`jitted.lower(*args).compile()` for the slice of `args`' shardings, analysed; a
  program the chip's HBM cannot hold is reported (fits=False), with what it would use (at
  least: where the compiler stopped at the temporaries, they and the arguments)."""
  start = time.perf_counter()
  try:
    with _no_persistent_cache():
      compiled = jitted.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- XLA raises its runtime error type, per version.
    text = str(e)
    used, temps = _OOM_RE.search(text), _OOM_TEMP_RE.search(text)
    if "RESOURCE_EXHAUSTED" not in text and not used:
      raise
    p = Program(name, time.perf_counter() - start, fits=False,
                error=text.strip().splitlines()[0][:300])
    if used:
      p.total = _bytes(used)
    elif temps:
      p.arguments, p.temporaries = argument_bytes(args), _bytes(temps)
      p.total = p.arguments + p.temporaries
    return p
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  mem = compiled.memory_analysis()
  p = Program(name, seconds, fits=True, flops=float(cost.get("flops", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)),
              collectives=collectives(compiled.as_text()))
  if mem is not None:
    p.arguments = int(mem.argument_size_in_bytes)
    p.outputs = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
    p.temporaries = int(mem.temp_size_in_bytes)
    p.total = (p.arguments + p.outputs + p.temporaries
               + int(getattr(mem, "generated_code_size_in_bytes", 0)))
    p.fits = p.total <= chip.hbm_gib * 2 ** 30
  return p


# ---------------------------------------------------------------------------------------
# The programs of a config.


def check_config_for_tpu(config) -> None:
  if config.model.attention_impl == "cudnn":
    raise errors.ConfigError("model.attention_impl='cudnn' is for NVIDIA GPUs; a TPU runs "
                             "XLA's attention (leave it unset, or 'xla')")


def _mesh(config, devices):
  from mlseg_jax import sharding as sharding_lib

  try:
    return sharding_lib.make_mesh(config.mesh, devices=devices)
  except ValueError as e:
    raise errors.ConfigError(f"{e}; this slice has {len(devices)} chips") from None


def _abstract(tree, shardings):
  import jax

  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def train_step_program(config, devices, batch: int, chip: Chip) -> Program:
  """The training step of `config` at global `batch` on `devices`, compiled."""
  import jax
  import jax.numpy as jnp

  from mlseg_jax import optimizer as optim_lib
  from mlseg_jax import sharding as sharding_lib
  from mlseg_jax import train
  from mlseg_jax.models.segmenter import abstract_params, build_model

  mesh = _mesh(config, devices)
  dp = sharding_lib.data_parallel_size(mesh)
  accum = config.train.grad_accum_steps
  if batch % (dp * accum):
    raise errors.ConfigError(f"batch {batch} does not split over the {dp} data-parallel "
                             f"chips{f' x {accum} accumulation steps' if accum > 1 else ''}")
  model = build_model(config.model)
  tx, schedule = optim_lib.make_optimizer(config.optim, abstract_params(config.model),
                                          config.train.total_steps)
  abstract, shardings = train.abstract_train_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, schedule, mesh, shardings)
  h, w = config.data.crop_size
  data = sharding_lib.batch_sharding(mesh)
  inputs = {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32, sharding=data),
            "label": jax.ShapeDtypeStruct((batch, h, w), jnp.int32, sharding=data)}
  return compile_program(f"train step, batch {batch} ({batch // dp} per chip)", step,
                         (_abstract(abstract, shardings), inputs), chip)


def eval_settings(config, name: str):
  """The `EvalSettings` evaluator `name` of `config` tests with (no dataset read: the
  normalisation does not change a program)."""
  from mlseg_jax.evaluation import evaluators as evaluators_lib

  class Stats:  # what eval_settings reads of a dataset
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  return evaluators_lib.EVALUATORS[name].eval_settings(config, Stats)


def eval_calls(config, devices, sizes) -> dict[str, collections.Counter]:
  """{evaluator: {(window_h, window_w, windows per call): calls}} of `config.eval.run`."""
  from mlseg_jax import sharding as sharding_lib
  from mlseg_jax.evaluation import batching as batching_lib
  from mlseg_jax.evaluation import runner

  mesh = _mesh(config, devices)
  shards = sharding_lib.data_parallel_size(mesh)
  processes = len({d.process_index for d in devices})
  batching = batching_lib.Batching.from_config(config.eval)
  return {name: runner.forward_calls(
      eval_settings(config, name), sizes, processes=processes,
      local_shards=shards // processes, batching=batching)
      for name in config.eval.run}


def eval_programs(config, devices, sizes, chip: Chip) -> tuple[list[Program], dict]:
  """Every evaluation forward `config.eval.run` calls for images of `sizes`, compiled
  once each (the evaluators share one jitted forward); and the calls per evaluator."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from mlseg_jax.evaluation import evaluators as evaluators_lib
  from mlseg_jax import optimizer as optim_lib
  from mlseg_jax import sharding as sharding_lib
  from mlseg_jax import train
  from mlseg_jax.models.decoders import decoder_spec
  from mlseg_jax.models.segmenter import abstract_params, build_model

  mesh = _mesh(config, devices)
  calls = eval_calls(config, devices, sizes)
  tx, _ = optim_lib.make_optimizer(config.optim, abstract_params(config.model),
                                   config.train.total_steps)
  abstract, shardings = train.abstract_train_state(config, build_model(config.model), tx,
                                                   mesh)
  params = _abstract(abstract.params, shardings.params)
  predict = evaluators_lib.make_predict_fn(config.model)
  windows = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
  gt = decoder_spec(config.model).needs_labels
  masked = eval_settings(config, config.eval.run[0]).masked_padding
  total = collections.Counter()
  for per in calls.values():
    total.update(per)
  programs = []
  for (wh, ww, n), count in sorted(total.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv)):
    args = [params, jax.ShapeDtypeStruct((n, wh, ww, 3), jnp.float32, sharding=windows)]
    if gt:
      args.append(jax.ShapeDtypeStruct((n, config.model.num_classes), jnp.bool_,
                                       sharding=windows))
    if masked:
      args.append(jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=windows))
    p = compile_program(f"eval forward {wh}x{ww}, {n} windows", predict, args, chip)
    p.calls = count
    programs.append(p)
  return programs, {k: {"programs": len(v), "calls": sum(v.values())}
                    for k, v in calls.items()}


MAX_BATCH_LIMIT = 1024  # per chip; a search that reaches it says more may fit


def max_batch_per_chip(config, devices, chip: Chip, first: Program | None = None,
                       hint: int | None = None,
                       limit: int = MAX_BATCH_LIMIT) -> tuple[int, list[Program]]:
  """The largest batch per chip whose training step fits, by compiling. Near the chip's HBM
  XLA's TPU compiler rematerialises to fit, so memory stops growing with the batch and no
  prediction from small batches holds: the search starts at `hint` (a similar row's answer)
  or, without one, at the linear prediction from 1 and 2 per chip, gallops (steps doubling)
  to a batch that fits and one that does not, and bisects between them. A start at the
  answer costs two compiles."""
  from mlseg_jax import sharding as sharding_lib

  dp = sharding_lib.data_parallel_size(_mesh(config, devices))
  tried: dict[int, Program] = {}

  def fits(b: int) -> bool:
    if b not in tried:
      p = tried[b] = train_step_program(config, devices, b * dp, chip)
      # A search is many compiles of minutes each: say where it is.
      print(f"max batch: {b} per chip {'fits' if p.fits else 'does not fit'} "
            f"({p.total / 2 ** 30:.2f} of {chip.hbm_gib:g} GiB), compiled in "
            f"{p.compile_s:.0f} s", flush=True)
    return tried[b].fits

  def done(best: int) -> tuple[int, list[Program]]:
    return best, list(tried.values())

  if first is not None and first.fits:
    tried[max(1, _per_chip(first))] = first
  if hint is None:
    if not fits(1):
      return done(0)
    if not fits(2):
      return done(1)
    slope = tried[2].total - tried[1].total
    hint = (int(2 + (chip.hbm_gib * 2 ** 30 - tried[2].total) // slope) if slope > 0
            else 4)
  start = min(max(hint, 1), limit)
  step = 1
  if fits(start):
    lo = start
    while True:
      if lo == limit:
        return done(lo)
      b = min(lo + step, limit)
      if not fits(b):
        hi = b
        break
      lo, step = b, 2 * step
  else:
    hi = start
    while True:
      if hi == 1:
        return done(0)
      b = max(hi - step, 1)
      if fits(b):
        lo = b
        break
      hi, step = b, 2 * step
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return done(lo)


def _per_chip(p: Program) -> int:
  m = re.search(r"\((\d+) per chip\)", p.name)
  return int(m.group(1)) if m else 1


# ---------------------------------------------------------------------------------------
# The command.


def ade20k_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
  """(h, w) of n images drawn like ADE20K val's: half 512x683 / 683x512 (3:1), the rest of
  short side 256-768 and aspect 1-2, landscape or portrait."""
  import numpy as np

  rng = np.random.default_rng(seed)
  sizes = []
  for _ in range(n):
    if rng.random() < 0.5:
      sizes.append((512, 683) if rng.random() < 0.75 else (683, 512))
      continue
    short = int(rng.integers(256, 769))
    long = int(short * rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]))
    sizes.append((short, long) if rng.random() < 0.7 else (long, short))
  return sizes


def parse_sizes(text: str, n: int) -> list[tuple[int, int]]:
  if text == "ade20k":
    return ade20k_sizes(n)
  try:
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
    raise errors.UsageError(f"--sizes={text!r}: 'ade20k' or HxW,HxW,... of positive ints")
  return [sizes[i % len(sizes)] for i in range(n)]


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f}"


def format_table(s: Slice, programs: list[Program]) -> str:
  """One row per program (see the module docstring)."""
  chip = s.chip
  head = ["program", "compile s", "GFLOP/chip", "args GiB", "out GiB", "temp GiB",
          "total GiB", f"fits {chip.hbm_gib:g} GiB", "collectives", "roofline ms",
          "MFU bound"]
  rows = []
  for p in programs:
    bound, mfu = p.roofline(chip)
    coll = ", ".join(f"{v['count']} {k} ({v['bytes'] / 2 ** 20:.1f} MiB)"
                     for k, v in sorted(p.collectives.items())) or "none"
    over = p.total - chip.hbm_gib * 2 ** 30
    fit = "fits" if p.fits else (f"over by {_gib(over)} GiB" if over > 0 else "no")
    rows.append([p.name + (f" x{p.calls}" if p.calls > 1 else ""), f"{p.compile_s:.1f}",
                 f"{p.flops / 1e9:.1f}" if p.fits else "-",
                 _gib(p.arguments), _gib(p.outputs), _gib(p.temporaries), _gib(p.total),
                 fit, coll if p.fits else "-", f"{bound * 1e3:.2f}" if p.fits else "-",
                 f"{mfu:.0%}" if p.fits else "-"])
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
  line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
  out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  return "\n".join(out + [line(r) for r in rows])


def run(config, topology: str, *, batch: int | None = None, find_max_batch: bool = False,
        max_batch_hint: int | None = None, with_train: bool = True, with_eval: bool = True,
        sizes=None) -> dict[str, Any]:
  """Compiles `config`'s programs for the slice `topology`; every number, as a dict.
  `with_train=False` skips the step at the config's batch, not the max-batch search."""
  s = parse_slice(topology)
  check_config_for_tpu(config)
  devices = slice_devices(s)
  report: dict[str, Any] = dict(
      topology=s.name, libtpu_topology=s.topology, chips=s.chips, hosts=s.hosts,
      chip=dataclasses.asdict(s.chip), device_kind=devices[0].device_kind,
      attention_impl=config.model.attention_impl or "xla", remat=bool(config.model.remat),
      dtype=config.model.dtype)
  programs: list[Program] = []
  step = None
  if with_train:
    b = batch or config.train.batch_size
    step = train_step_program(config, devices, b, s.chip)
    programs.append(step)
    report["train_batch"] = b
  if find_max_batch:
    best, tried = max_batch_per_chip(config, devices, s.chip, first=step, hint=max_batch_hint)
    report["max_batch_per_chip"] = best
    report["max_batch_tried"] = {_per_chip(p): p.fits for p in tried}
    programs += [p for p in tried if p is not step]
  if with_eval:
    sizes = sizes or ade20k_sizes(2000)
    evals, per_evaluator = eval_programs(config, devices, sizes, s.chip)
    programs += evals
    report["eval"] = dict(images=len(sizes), evaluators=per_evaluator,
                          programs=len(evals),
                          compile_s=sum(p.compile_s for p in evals))
  report["programs"] = [dict(dataclasses.asdict(p), roofline_s=p.roofline(s.chip)[0],
                             mfu_bound=p.roofline(s.chip)[1]) for p in programs]
  report["table"] = format_table(s, programs)
  return report


def _define_flags() -> None:
  """The command's flags, defined only when it runs: `main` imports this module's
  functions into its process, where a second `--config` flag would collide."""
  global _CONFIG, _TOPOLOGY, _BATCH, _MAX_BATCH, _HINT, _EVAL, _TRAIN, _SIZES, _IMAGES, _JSON
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config (configs/NAME.py or NAME).",
                                            lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5e-8, v4-8, v5p-8, v6e-8, "
                                  "v5e-32, ... or a libtpu topology such as v5e:2x4.")
  _BATCH = flags.DEFINE_integer("batch", None, "Global training batch (default: the config's).")
  _MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find, by compiling, the largest "
                                 "batch per chip whose training step fits the chip's HBM.")
  _HINT = flags.DEFINE_integer("max_batch_hint", None, "Start the --max_batch search at this "
                               "batch per chip (e.g. a similar row's answer): the same "
                               "answer, in fewer compiles the closer it is.", lower_bound=1)
  _EVAL = flags.DEFINE_bool("eval", True, "Compile the evaluation forwards too.")
  _TRAIN = flags.DEFINE_bool("train", True, "Compile the training step at the config's "
                             "batch (--max_batch searches all the same).")
  _SIZES = flags.DEFINE_string("sizes", "ade20k", "Evaluation image sizes: 'ade20k' (drawn "
                               "like ADE20K val's) or HxW,HxW,... (cycled to --images).")
  _IMAGES = flags.DEFINE_integer("images", 2000, "Evaluation images whose calls are counted.")
  _JSON = flags.DEFINE_string("json", None, "Write every number to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise errors.UsageError("--config and --topology are required")
  if _HINT.value is not None and not _MAX_BATCH.value:
    raise errors.UsageError("--max_batch_hint needs --max_batch")
  from mlseg_jax.configs import validate

  config = _CONFIG.value
  if _BATCH.value is not None:
    config.train.batch_size = _BATCH.value
  validate.validate_config(config, num_devices=parse_slice(_TOPOLOGY.value).chips)
  report = run(config, _TOPOLOGY.value, find_max_batch=_MAX_BATCH.value,
               max_batch_hint=_HINT.value,
               with_train=_TRAIN.value, with_eval=_EVAL.value,
               sizes=parse_sizes(_SIZES.value, _IMAGES.value) if _EVAL.value else None)
  print(f"{report['topology']} ({report['libtpu_topology']}: {report['chips']} chips of "
        f"{report['device_kind']}, {report['hosts']} host(s)); attention "
        f"{report['attention_impl']}, remat {report['remat']}, {report['dtype']}")
  print(report["table"])
  if "max_batch_per_chip" in report:
    best = report["max_batch_per_chip"]
    print(f"largest training batch per chip that fits: {best}" + (
        " (the search's limit: more may fit)" if best >= MAX_BATCH_LIMIT else ""))
  if "eval" in report:
    e = report["eval"]
    print(f"evaluation of {e['images']} images ({_SIZES.value}): {e['programs']} forward "
          f"programs, {e['compile_s']:.0f} s of compilation; " + "; ".join(
              f"{k}: {v.get('calls', 0)} calls" for k, v in e["evaluators"].items()))
  if _JSON.value:
    from etils import epath

    epath.Path(_JSON.value).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
