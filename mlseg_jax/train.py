"""Training: sharded step, reference recipe, Orbax checkpoints, progress and TensorBoard.

Read top to bottom: state, step, checkpointing, the loop. The step is one pure function
jitted with explicit in/out shardings and the state donated; the state is created directly
in its target sharding (`jax.eval_shape` + jitted init), so nothing ever sits whole on one
device. Restore order (big_vision's): this workdir's latest checkpoint -> `init_from`
pretrained weights -> random init.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging as pylogging
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mlseg_jax import metrics as metrics_lib
from mlseg_jax import optimizer as optim_lib
from mlseg_jax import preemption
from mlseg_jax.paths import absolute_path
from mlseg_jax import sharding as sharding_lib
from mlseg_jax.models.decoders import compute_losses
from mlseg_jax.models.segmenter import build_model


# ---------------------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step t uses fold_in(rng, t), so resumes replay.


def sample_inputs(config, batch: int = 1):
  """(images, labels) of the training crop's shape, for init (the +GT head reads labels)."""
  h, w = config.data.crop_size
  return jnp.zeros((batch, h, w, 3)), jnp.zeros((batch, h, w), jnp.int32)


def _init_fn(config, model, tx):
  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    images, labels = sample_inputs(config)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, images,
                           labels=labels, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  return init


def abstract_train_state(config, model, tx, mesh):
  """(shape-only state, its shardings): what a restore needs, without computing anything."""
  abstract = jax.eval_shape(_init_fn(config, model, tx), jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(mesh, abstract, config.mesh.rules,
                                          config.mesh.min_fsdp_size)
  return abstract, shardings


def create_train_state(config, model, tx, mesh):
  """(state, shardings): the state created directly in its target sharding."""
  _, shardings = abstract_train_state(config, model, tx, mesh)
  init = jax.jit(_init_fn(config, model, tx), out_shardings=shardings)
  return init(jax.random.PRNGKey(config.train.seed)), shardings


def abstract_params(config, model):
  images, labels = sample_inputs(config)
  return jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                         images, labels=labels, train=False))["params"]


# ---------------------------------------------------------------------------------------
# The step.


def make_train_step(config, model, tx, schedule, mesh, state_shardings):
  """Jitted `step(state, batch) -> (state, metrics)`; batch = {"image", "label"} global."""
  accum = config.train.grad_accum_steps
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def loss_fn(params, images, labels, rng):
    out = model.apply({"params": params}, images, train=True, labels=labels,
                      rngs={"dropout": rng})
    return compute_losses(out, labels, config.model)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    images, labels = batch["image"], batch["label"]
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, images, labels, rng)
    else:
      # Micro-batch r takes images r, r + accum, ...: every device keeps an equal share
      # of each micro-batch (its contiguous slice of the batch is divisible by accum).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      def micro(carry, xs):
        i, (imgs, lbls) = xs
        imgs = jax.lax.with_sharding_constraint(imgs, batch_sharding)
        lbls = jax.lax.with_sharding_constraint(lbls, batch_sharding)
        (loss, metrics), grads = grad_fn(state.params, imgs, lbls, jax.random.fold_in(rng, i))
        acc_grads, acc_loss, acc_metrics = carry
        return (jax.tree_util.tree_map(jnp.add, acc_grads, grads), acc_loss + loss,
                jax.tree_util.tree_map(jnp.add, acc_metrics, metrics)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      metric_shapes = jax.eval_shape(grad_fn, state.params, images[:1], labels[:1], rng)[0][1]
      zero_metrics = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
      (grads, loss, metrics), _ = jax.lax.scan(
          micro, (zeros, jnp.zeros((), jnp.float32), zero_metrics),
          (jnp.arange(accum), (split(images), split(labels))))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree_util.tree_map(lambda m: m / accum, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, lr=schedule(state.step),
                   grad_norm=optax.global_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def global_batch(local_batch: dict, mesh) -> dict:
  """Per-host numpy batch -> the step's global {"image", "label"} over the data axes."""
  from mlseg_jax.data import make_global_batch

  return make_global_batch({k: local_batch[k] for k in ("image", "label")},
                           sharding_lib.batch_sharding(mesh))


# ---------------------------------------------------------------------------------------
# Checkpoints.

DAMAGED_DIR = "damaged_checkpoints"  # Checkpoints that did not read back, kept for a look.


class _KeepStep:
  """Orbax preservation policy: keep the step `step_fn()` names (the best one), if any."""

  def __init__(self, step_fn: Callable[[], Optional[int]]):
    self.step_fn = step_fn

  def should_preserve(self, checkpoints, *, context):
    del context
    keep = self.step_fn()
    return [info.step == keep for info in checkpoints]


def checkpoint_manager(workdir, config, keep_step: Optional[Callable[[], Optional[int]]] = None
                       ) -> ocp.CheckpointManager:
  """The last `train.keep_checkpoints` steps, and the step `keep_step()` names besides."""
  policies = [ocp.checkpoint_managers.LatestN(n=config.train.keep_checkpoints)]
  if keep_step is not None:
    policies.append(_KeepStep(keep_step))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=config.train.async_checkpoints,
      create=True)
  return ocp.CheckpointManager(absolute_path(workdir) / "checkpoints", options=options)


def _with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def save_checkpoint(mngr, state, data_iter=None, *, force=False):
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(int(state.step), args=ocp.args.Composite(**items), force=force)


def restore_checkpoint(mngr, state, shardings, data_iter=None, step=None):
  """Restores onto `shardings`, whatever mesh and number of processes wrote it."""
  step = mngr.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(_with_shardings(state, shardings))}
  data_state = None
  if data_iter is not None:
    data_state = _data_state_from_other_process_count(epath.Path(mngr.directory) / str(step))
    if data_state is None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if data_state is not None:
    data_iter.set_state(data_state)
  return restored["state"]


def _data_state_from_other_process_count(step_dir: epath.Path):
  """The input position saved by a run with another number of processes, or None.

  Grain writes one file per process (process_P-of-N.json). Every process of the training
  stream stands at the same batch index (it reads positions p, p + N, ... of one global
  stream, and batch i of all processes together is global batch i whatever N is), so any
  process count can continue from that index.
  """
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  data_dir = step_dir / "data"
  if not data_dir.exists() or (data_dir / name).exists():
    return None
  saved = sorted(data_dir.glob("process_*-of-*.json"))
  states = {f.read_text() for f in saved}
  if len(states) != 1:
    raise ValueError(f"{data_dir}: the input position was saved by {len(saved)} processes "
                     f"at different positions; it cannot continue on "
                     f"{jax.process_count()} processes")
  return json.loads(states.pop())


def restore_latest(mngr, state, shardings, data_iter=None):
  """(state, step) of the newest checkpoint that reads back on every process, or
  (None, None) when there is none.

  One that does not read back (truncated files, missing metadata) is reported in one line
  naming its step and the reason, moved to WORKDIR/damaged_checkpoints/STEP (kept, not
  deleted), and the one before it is tried.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    error = None
    with _tensorstore_teardown_quiet() as quiet:
      try:
        metadata = epath.Path(mngr.directory) / str(step) / "state" / "_METADATA"
        if not metadata.exists():  # Orbax's own error would be about pytree structure.
          raise FileNotFoundError(f"{metadata} is missing")
        restored = restore_checkpoint(mngr, state, shardings, data_iter, step=step)
      except Exception as e:  # noqa: BLE001  (whatever the damage, try the previous step)
        error = e
        _drop_abandoned_read_errors()
        quiet.settle()
    if not _failed_on_any_process(error is not None):
      return restored, step
    reason = _one_line(error) if error is not None else "another process could not read it"
    aside = _move_aside(mngr, step)
    logging.error("checkpoint step %d does not read back (%s); moved to %s, trying the "
                  "previous one", step, reason, aside)
    mngr.reload()
  return None, None


def _failed_on_any_process(failed: bool) -> bool:
  if jax.process_count() == 1:
    return failed
  return bool(np.any(multihost_utils.process_allgather(np.asarray(failed))))


def _one_line(error: BaseException) -> str:
  """The innermost cause's first line: the file and what was wrong with it."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 400 else text[:400] + "..."


def _move_aside(mngr, step) -> epath.Path:
  src = epath.Path(mngr.directory) / str(step)
  dst_root = epath.Path(mngr.directory).parent / DAMAGED_DIR
  dst = dst_root / str(step)
  if jax.process_index() == 0:
    dst_root.mkdir(parents=True, exist_ok=True)
    n = 1
    while dst.exists():
      dst, n = dst_root / f"{step}.{n}", n + 1
    src.rename(dst)
  from mlseg_jax import distributed

  distributed.sync(f"damaged_checkpoint_{step}")
  return dst


def _drop_abandoned_read_errors():
  """From now on, the reads a failed restore abandoned die quietly: each one's coroutine,
  whenever it is destroyed, would print its own copy of the failure ("Exception ignored
  in: <coroutine ...>" and a page of TensorStore spec). The failure itself was reported."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return  # A read completing after its restore gave up, as above.
    previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook
  # The same abandoned reads, seen by the warnings module and by asyncio's logger.
  warnings.filterwarnings("ignore", message=r"coroutine '_read_array\w*' was never awaited",
                          category=RuntimeWarning)
  pylogging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


class _TensorstoreTeardownQuiet:
  """Holds back the "Event loop is closed" tracebacks of a failed Orbax read.

  When one array of a restore fails, Orbax closes its event loop while TensorStore's other
  reads are still in flight; each then prints a traceback from its completion callback
  (dozens, minutes of scrolling, none of them the cause). Python's own stderr is held for
  the attempt, and after a failure until those reads have finished; everything else it
  received is passed on.
  """

  _NOISE = re.compile(
      r"Traceback \(most recent call last\):\n"
      r"|  File \"[^\"]*asyncio[/\\]base_events\.py\", line \d+, in (call_soon_threadsafe|_check_closed)\n"
      r"|    self\._check_closed\(\)\n"
      r"|    raise RuntimeError\('Event loop is closed'\)\n"
      r"|RuntimeError: Event loop is closed\n")

  def __init__(self):
    self._chunks = []

  def write(self, text):
    self._chunks.append(text)
    return len(text)

  def flush(self):
    pass

  def settle(self, quiet_s: float = 0.5, max_s: float = 10.0):
    """Waits until nothing was written for `quiet_s` (at most `max_s`), collecting the
    abandoned read coroutines meanwhile (each one's exception is "ignored" with a page of
    TensorStore spec when it is destroyed)."""
    start = time.monotonic()
    seen = -1
    while len(self._chunks) != seen and time.monotonic() - start < max_s:
      seen = len(self._chunks)
      time.sleep(quiet_s)
      gc.collect()


  def passed_on(self) -> str:
    return self._NOISE.sub("", "".join(self._chunks))


@contextlib.contextmanager
def _tensorstore_teardown_quiet():
  quiet, real = _TensorstoreTeardownQuiet(), sys.stderr
  sys.stderr = quiet
  try:
    yield quiet
  finally:
    sys.stderr = real
    rest = quiet.passed_on()
    if rest.strip():
      real.write(rest)


# ---------------------------------------------------------------------------------------
# Progress.


class Progress:
  """A bar with ETA on terminals, a log line every `log_every` steps, TensorBoard scalars.

  Metrics stay on device until a log step, so the loop never waits on the host.
  """

  def __init__(self, workdir, total_steps, first_step, log_every, batch_size, is_main):
    self.total, self.log_every, self.batch_size = total_steps, log_every, batch_size
    self.is_main = is_main
    self.pending = []
    self.last_time, self.last_step = time.time(), first_step
    self.writer = None
    self.bar = None
    if is_main:
      from mlseg_jax.tensorboard import open_summary_writer

      self.writer = open_summary_writer(epath.Path(workdir) / "tensorboard")
      if sys.stderr.isatty():
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

  def update(self, step, metrics):
    """`step` is the number of steps done; metrics those of the last step."""
    self.pending.append(metrics)
    if self.bar is not None:
      self.bar.update(1)
    if step % self.log_every and step != self.total:
      return None
    host = jax.device_get(self.pending)
    self.pending = []
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    mean["lr"] = float(host[-1]["lr"])
    now = time.time()
    mean["images_per_s"] = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    if self.is_main:
      line = " ".join(f"{k}={v:.4g}" for k, v in sorted(mean.items()))
      logging.info("step %d/%d %s", step, self.total, line)
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{mean['loss']:.4f}")
      self.write_scalars(step, mean, prefix="train")
    return mean

  def write_scalars(self, step, scalars, prefix):
    if self.writer is not None:
      for k, v in scalars.items():
        self.writer.add_scalar(f"{prefix}/{k}", v, step)
      self.writer.flush()

  def close(self, timeout: float = 30.0):
    """Within `timeout` s: a stop after a signal must not hang on a flush to a bucket."""
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.writer is not None:
      preemption.call_with_timeout(self.writer.close, timeout, "TensorBoard writer")
      self.writer = None


# ---------------------------------------------------------------------------------------
# Evaluations and the best checkpoint.

EVALUATIONS_FILE = "evaluations.json"
# What `train.best_metric` may name: the summary numbers every evaluation reports (the
# multi-label ones only for MLSeg models). Higher is better for all of them.
BEST_METRICS = ("mIoU", "aAcc", "mAcc") + metrics_lib.MultiLabelMetrics.KEYS


class Evaluations:
  """WORKDIR/evaluations.json: the steps evaluated, their scores and the best step.

  Process 0 writes it after each evaluation; every process reads it when a run starts, so
  a resumed run knows whether its first step still lacks its evaluation (a run stopped
  during it) and which checkpoint is the best one to keep.
  """

  def __init__(self, workdir: epath.Path, metric: str):
    self.path, self.metric = workdir / EVALUATIONS_FILE, metric
    data = json.loads(self.path.read_text()) if self.path.exists() else {}
    self.scalars = {int(k): v for k, v in data.get("steps", {}).items()}
    best = data.get("best") or {}
    self.best_step = best.get("step") if best.get("metric") == metric else None
    if metric and self.best_step is None and self.scalars:
      self._update_best()

  def done(self, step: int) -> bool:
    return step in self.scalars

  def score(self, scalars: dict) -> Optional[float]:
    if not self.metric:
      return None
    for key, value in scalars.items():
      if key.rsplit("/", 1)[-1] == self.metric:
        return float(value)
    raise ValueError(f"train.best_metric={self.metric!r} is not among the evaluation's "
                     f"results {sorted(k.rsplit('/', 1)[-1] for k in scalars)}")

  def _update_best(self):
    scored = [(self.score(v), s) for s, v in self.scalars.items()]
    scored = [(v, s) for v, s in scored if v is not None and np.isfinite(v)]
    # The earliest of equal scores: a later step must do better to replace it.
    self.best_step = max(scored, key=lambda vs: (vs[0], -vs[1]))[1] if scored else None

  def add(self, step: int, scalars: dict, checkpoints: epath.Path) -> bool:
    """Records an evaluation; True when `step` is the new best."""
    previous = self.best_step
    self.scalars[step] = {k: float(v) for k, v in scalars.items()}
    self._update_best()
    data = {"metric": self.metric,
            "steps": {str(s): v for s, v in sorted(self.scalars.items())}}
    if self.best_step is not None:
      data["best"] = {"metric": self.metric, "step": self.best_step,
                      "score": self.score(self.scalars[self.best_step]),
                      "checkpoint": os.fspath(checkpoints / str(self.best_step))}
    from mlseg_jax import distributed

    if distributed.is_main_process():
      self.path.write_text(json.dumps(data, indent=2) + "\n")
    return self.best_step == step and previous != step


# ---------------------------------------------------------------------------------------
# The loop.


def setup(config, mesh=None):
  """Model, optimizer, mesh, state and jitted step of a config."""
  mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
  model = build_model(config.model)
  tx, schedule = optim_lib.make_optimizer(config.optim, abstract_params(config, model),
                                          config.train.total_steps)
  state, shardings = create_train_state(config, model, tx, mesh)
  step_fn = make_train_step(config, model, tx, schedule, mesh, shardings)
  return model, mesh, state, shardings, step_fn


def train(config: ml_collections.ConfigDict, workdir: str, *,
          data_iter: Optional[Iterator] = None,
          evaluate_fn: Optional[Callable[[Any, int], dict]] = None,
          mesh=None, stop_after: Optional[int] = None):
  """Trains (or resumes) `config` in `workdir`; returns the final state and last metrics.

  data_iter: per-host numpy batches (default: the config's Grain pipeline); a Grain
    iterator is checkpointed with the model.
  evaluate_fn(params, step) -> scalars: run every `train.eval_every` steps and at the end,
    each time after that step's checkpoint; the best by `train.best_metric` is kept.
  stop_after: stop (with a checkpoint) after this many steps in this call -- for tests
    and for splitting a run into jobs.

  SIGTERM / SIGINT stop the run at the next step boundary (on several processes: the same
  step on all of them) with that step's checkpoint complete, and raise
  `preemption.Preempted`; rerunning resumes it. A run resumed at a step whose evaluation
  never finished runs it first; one resumed at `total_steps` only finishes what the end of
  training does.
  """
  from mlseg_jax import distributed

  workdir = absolute_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = distributed.is_main_process()
  t = config.train
  total = t.total_steps
  evaluations = Evaluations(workdir, t.best_metric)
  mngr = checkpoint_manager(workdir, config, keep_step=lambda: evaluations.best_step)

  with preemption.handling_signals():
    # Every process tells JAX's preemption sync the step it starts from before anything
    # slow (compiling, restoring), so a notice that comes meanwhile still finds one step
    # all of them reach.
    preemption.should_stop(mngr.latest_step() or 0)
    model, mesh, state, shardings, step_fn = setup(config, mesh)
    if data_iter is None:
      from mlseg_jax import data as data_lib

      data_iter = data_lib.make_train_iterator(config.data, t.batch_size, t.seed)
    checkpointable_iter = data_iter if hasattr(data_iter, "get_state") else None
    to_device = functools.partial(global_batch, mesh=mesh)
    prefetcher = None
    if t.prefetch:
      from mlseg_jax.data.pipeline import DevicePrefetch

      data_iter = prefetcher = DevicePrefetch(data_iter, to_device, t.prefetch)
      checkpointable_iter = prefetcher if checkpointable_iter is not None else None
    else:
      data_iter = map(to_device, data_iter)  # Lazy: each batch read when the loop asks.

    restored, restored_step = restore_latest(mngr, state, shardings, checkpointable_iter)
    if restored is not None:
      state = restored
      logging.info("resumed from %s at step %d", mngr.directory, restored_step)
    elif config.init_from:
      from mlseg_jax import pretrained

      params, kept = pretrained.init_from(jax.device_get(state.params), config.init_from)
      state = state.replace(params=jax.device_put(params, shardings.params))
      logging.info("initialised from %s (%d parameters kept their init)", config.init_from,
                   len(kept))
    if is_main:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    first = int(state.step)
    progress = Progress(workdir, total, first, t.log_every, t.batch_size, is_main)
    last_metrics = None
    saved_at = first if restored is not None else None
    step = first

    def is_eval_step(s):
      return evaluate_fn is not None and s > 0 and (s % t.eval_every == 0 or s == total)

    def evaluate(s):
      logging.info("evaluating step %d", s)
      scalars = evaluate_fn(state.params, s)
      progress.write_scalars(s, scalars, prefix="eval")
      if evaluations.add(s, scalars, epath.Path(mngr.directory)):
        logging.info("best checkpoint so far: step %d, %s=%.4f (%s/%d)", s,
                     evaluations.metric, evaluations.score(scalars), mngr.directory, s)

    stopped = False
    try:
      if restored is not None and is_eval_step(first) and not evaluations.done(first):
        logging.info("step %d was checkpointed but not evaluated: evaluating it first", first)
        evaluate(first)
      if first == total and restored is not None:
        _finish_train_metrics(workdir, total, None, is_main)
      while step < total and (stop_after is None or step - first < stop_after):
        if preemption.should_stop(step):
          stopped = True
          break
        batch = next(data_iter)
        state, metrics = step_fn(state, batch)
        step += 1
        logged = progress.update(step, metrics)
        last_metrics = logged or last_metrics
        if step == total:
          # Before the last checkpoint: a run stopped after it still finds this file.
          _finish_train_metrics(workdir, total, last_metrics, is_main)
        if step % t.checkpoint_every == 0 or step == total or is_eval_step(step):
          save_checkpoint(mngr, state, checkpointable_iter)
          saved_at = step
        if is_eval_step(step):
          evaluate(step)
    except preemption.Interrupted:
      stopped = True  # A signal during an evaluation: its step's checkpoint is written.
    except BaseException:
      # An error (a bad record, a full disk): keep the work done so far.
      try:
        if saved_at is None or int(state.step) > saved_at:
          logging.warning("stopped by an error at step %d: saving a checkpoint first",
                          int(state.step))
          save_checkpoint(mngr, state, checkpointable_iter, force=True)
        mngr.wait_until_finished()
      except Exception as save_error:  # E.g. the failed step had consumed its donated state.
        logging.error("could not save the interrupted state (%s); the last checkpoint is "
                      "step %s", save_error, saved_at)
      _close(prefetcher, progress)
      raise
    if saved_at is None or step > saved_at:
      save_checkpoint(mngr, state, checkpointable_iter, force=True)
      saved_at = step
    # Blocks until the (async) checkpoint is complete on every process. Signals arriving
    # meanwhile only set the flag again.
    mngr.wait_until_finished()
    _close(prefetcher, progress)
  if stopped:
    raise preemption.Preempted(step, preemption.reason(), f"{mngr.directory}/{step}")
  return state, last_metrics


def _finish_train_metrics(workdir, step, metrics, is_main):
  """WORKDIR/train_metrics.json: the training metrics last logged, at the end of training."""
  path = workdir / "train_metrics.json"
  if not is_main:
    return
  if metrics is None:
    if path.exists():
      return
    logging.warning("%s is missing and the metrics of step %d are gone with that run",
                    path, step)
    return
  path.write_text(json.dumps(dict(metrics, step=step), indent=2))


def _close(prefetcher, progress, timeout: float = 30.0):
  if prefetcher is not None:
    prefetcher.close(timeout)
  progress.close(timeout)
