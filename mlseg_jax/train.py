"""Training: sharded step, reference recipe, Orbax checkpoints, progress and TensorBoard.

Read top to bottom: state, step, progress, evaluations, the loop (`train`: set up or
restore, evaluate a resumed step, the steps, finish; then `_TrainingRun`, what the loop
calls, the error path among it; checkpoints are in checkpoints.py). The step is one pure
function jitted with explicit in/out shardings and the state donated; the state is created
directly in its target sharding (`jax.eval_shape` + jitted init), so nothing ever sits whole
on one device. Restore order (big_vision's): this workdir's latest checkpoint -> `init_from`
pretrained weights -> random init.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging as python_logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from tqdm import tqdm

from mlseg_jax import data as data_lib
from mlseg_jax import distributed
from mlseg_jax import errors
from mlseg_jax.evaluation import metrics as metrics_lib
from mlseg_jax import optimizer as optim_lib
from mlseg_jax import preemption
from mlseg_jax import pretrained
from mlseg_jax import sharding as sharding_lib
from mlseg_jax import tracking
from mlseg_jax.checkpoints import (checkpoint_manager, discard_failed_save,
                                   failed_on_any_process, restore_latest, save_checkpoint,
                                   save_error)
from mlseg_jax.data.pipeline import DevicePrefetch
from mlseg_jax.paths import writable_directory
from mlseg_jax.models.decoders import compute_losses
from mlseg_jax.models.segmenter import abstract_params, build_model
from mlseg_jax.tensorboard import open_summary_writer


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
  return data_lib.make_global_batch({k: local_batch[k] for k in ("image", "label")},
                           sharding_lib.batch_sharding(mesh))


# ---------------------------------------------------------------------------------------
# Progress.


def describe_devices(mesh) -> str:
  """The kinds of the mesh's devices, with counts where there are several kinds."""
  kinds = collections.Counter(d.device_kind for d in mesh.devices.flat)
  if len(kinds) == 1:
    return next(iter(kinds))
  return ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items()))


def _count(n) -> str:
  return "an unknown number of" if n is None else f"{n:,}"


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or infinite: the state is not worth a checkpoint."""


def _check_finite(losses, step):
  """losses: those of the steps up to `step`, the last one last."""
  for i, loss in enumerate(losses):
    if not np.isfinite(loss):
      raise NonFiniteLoss(f"the loss is {float(loss)} at step {step - len(losses) + 1 + i}: "
                          "training diverged; the checkpoints are kept as they were (lower "
                          "optim.lr, or set optim.grad_clip_norm)")


def describe_compiled_step(step_fn, state, batch) -> str:
  """XLA's own numbers for the compiled step: FLOPs, and memory per device.

  Compiles the step ahead of its first call; that call then reuses the executable.
  """
  compiled = step_fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list in older JAX.
  parts = []
  if cost and cost.get("flops"):
    parts.append(f"{cost['flops'] / 1e9:.4g} GFLOP per device")
  memory = compiled.memory_analysis()
  if memory is not None:
    gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
    parts.append(f"memory per device: arguments {gib(memory.argument_size_in_bytes)}, "
                 f"outputs {gib(memory.output_size_in_bytes)} "
                 f"({gib(memory.alias_size_in_bytes)} aliased with the arguments), "
                 f"temporaries {gib(memory.temp_size_in_bytes)}")
  return "; ".join(parts) or "no cost or memory analysis on this backend"


def format_duration(seconds: float) -> str:
  """H:MM:SS, as the bar shows it."""
  seconds = max(int(round(seconds)), 0)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _AboveTheBar(python_logging.Handler):
  """A root handler's records written with the bar cleared and redrawn afterwards, so a log
  line never lands in the middle of the bar's line (absl logs to the bar's stderr)."""

  def __init__(self, inner: python_logging.Handler, bar_file):
    super().__init__(inner.level)
    self.inner, self.bar_file = inner, bar_file

  def handle(self, record):
    with tqdm.external_write_mode(file=self.bar_file):
      return self.inner.handle(record)

  def emit(self, record):  # handle() above does the work; Handler requires emit.
    self.inner.emit(record)


class Progress:
  """A bar with ETA on terminals, a log line every `log_every` steps (with the ETA: pods and
  SLURM jobs have no terminal for the bar), scalars to the tracker (TensorBoard, W&B).

  Metrics stay on device until a log step, so the loop never waits on the host. While the
  bar is shown, the root logger's handlers write above it.
  """

  def __init__(self, workdir, total_steps, first_step, log_every, batch_size, is_main,
               tracker=None):
    self.total, self.log_every, self.batch_size = total_steps, log_every, batch_size
    self.is_main = is_main
    self.counters = {}  # name -> (() -> number): host-side counts added to each log line.
    self.pending = []
    self.last_time, self.last_step = time.time(), first_step
    # The ETA's rate is measured from the first log line on: the interval before it holds
    # the compilation.
    self.rate_origin = None
    self.tracker = tracker
    self.bar = None
    self._redirected = []  # (root handler, its wrapper) while the bar is shown.
    if is_main:
      if self.tracker is None:
        self.tracker = tracking.Tracker(open_summary_writer(epath.Path(workdir) / "tensorboard"))
      if sys.stderr.isatty():
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)
        self._log_above_the_bar()

  def _log_above_the_bar(self):
    root = python_logging.getLogger()
    for handler in list(root.handlers):
      wrapper = _AboveTheBar(handler, self.bar.fp)
      root.removeHandler(handler)
      root.addHandler(wrapper)
      self._redirected.append((handler, wrapper))

  def _restore_handlers(self):
    root = python_logging.getLogger()
    for handler, wrapper in self._redirected:
      root.removeHandler(wrapper)
      root.addHandler(handler)
    self._redirected = []

  def eta(self, step, now) -> float | None:
    """Seconds left at `step`, at the rate since the first log line (evaluations included,
    as the rest of the run has them too), or the last interval's before there is one."""
    origin = self.rate_origin or (self.last_time, self.last_step)
    if step <= origin[1]:
      return None
    return (self.total - step) * (now - origin[0]) / (step - origin[1])

  def update(self, step, metrics):
    """`step` is the number of steps done; metrics those of the last step."""
    self.pending.append(metrics)
    if self.bar is not None:
      self.bar.update(1)
    if step % self.log_every and step != self.total:
      return None
    host = jax.device_get(self.pending)
    self.pending = []
    _check_finite([m["loss"] for m in host], step)
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    mean["lr"] = float(host[-1]["lr"])
    now = time.time()
    mean["images_per_s"] = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    eta = self.eta(step, now)
    self.last_time, self.last_step = now, step
    self.rate_origin = self.rate_origin or (now, step)
    mean.update({name: float(count()) for name, count in self.counters.items()})
    if self.is_main:
      line = " ".join(f"{k}={v:.4g}" for k, v in sorted(mean.items()))
      logging.info("step %d/%d eta=%s %s", step, self.total,
                   "?" if eta is None else format_duration(eta), line)
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{mean['loss']:.4f}")
      self.write_scalars(step, mean, prefix="train")
    return mean

  def check_finite(self, step):
    """Before a checkpoint: the steps not logged yet have finite losses (a sync)."""
    _check_finite(jax.device_get([m["loss"] for m in self.pending]), step)

  def write_scalars(self, step, scalars, prefix):
    if self.tracker is not None:
      self.tracker.scalars(step, scalars, prefix=prefix)

  def close(self, timeout: float = 30.0):
    """Within `timeout` s: a stop after a signal must not hang on a flush to a bucket."""
    if self.bar is not None:
      self._restore_handlers()
      self.bar.close()
      self.bar = None
    if self.tracker is not None:
      self.tracker.close(timeout)
      self.tracker = None


# ---------------------------------------------------------------------------------------
# Evaluations and the best checkpoint.

EVALUATIONS_FILE = "evaluations.json"
BEST_METRICS = metrics_lib.BEST_METRICS


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
    self._update_best()  # The file's "best" is for readers; the scores decide.

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
    self._write(checkpoints)
    return self.best_step == step and previous != step

  def forget(self, step: int, checkpoints: epath.Path) -> None:
    """Drops `step`'s evaluation: its checkpoint failed after it was evaluated (a save in
    the background), so it is not the best one to keep, and a rerun that trains that step
    again evaluates it again."""
    if self.scalars.pop(step, None) is not None:
      self._update_best()
      self._write(checkpoints)

  def _write(self, checkpoints: epath.Path):
    data = {"metric": self.metric,
            "steps": {str(s): v for s, v in sorted(self.scalars.items())}}
    if self.best_step is not None:
      data["best"] = {"metric": self.metric, "step": self.best_step,
                      "score": self.score(self.scalars[self.best_step]),
                      "checkpoint": os.fspath(checkpoints / str(self.best_step))}
    if distributed.is_main_process():
      # Whole or not at all: a disk that fills mid-write leaves the previous file.
      partial = self.path.parent / f".{self.path.name}.partial"
      with errors.writing(self.path, what=os.fspath(self.path)):  # Not the partial's name.
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(self.path)


# ---------------------------------------------------------------------------------------
# The loop.


def setup(config, mesh=None):
  """Model, optimizer, mesh, state and jitted step of a config."""
  mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
  model = build_model(config.model)
  tx, schedule = optim_lib.make_optimizer(config.optim, abstract_params(config.model),
                                          config.train.total_steps)
  state, shardings = create_train_state(config, model, tx, mesh)
  step_fn = make_train_step(config, model, tx, schedule, mesh, shardings)
  return model, mesh, state, shardings, step_fn


def train(config: ml_collections.ConfigDict, workdir: str, *,
          data_iter: Optional[Iterator] = None,
          evaluate_fn: Optional[Callable[[Any, int], dict]] = None,
          mesh=None, stop_after: Optional[int] = None,
          tracker: Optional[tracking.Tracker] = None):
  """Trains (or resumes) `config` in `workdir`; returns the final state and last metrics.

  data_iter: per-host numpy batches (default: the config's Grain pipeline); a Grain
    iterator is checkpointed with the model.
  evaluate_fn(params, step) -> scalars: run every `train.eval_every` steps and at the end,
    each time after that step's checkpoint; the best by `train.best_metric` is kept.
  stop_after: stop (with a checkpoint) after this many steps in this call -- for tests
    and for splitting a run into jobs.
  tracker: where the training and evaluation scalars go (default: `tracking.open_tracker`,
    TensorBoard and with logging.wandb W&B); closed when training ends.

  SIGTERM / SIGINT stop the run at the next step boundary (on several processes: the same
  step on all of them) with that step's checkpoint complete, and raise
  `preemption.Preempted`; rerunning resumes it. A run resumed at a step whose evaluation
  never finished runs it first; one resumed at `total_steps` only finishes what the end of
  training does.

  A checkpoint that cannot be written (a full disk, a read-only folder), synchronous or
  written in the background, stops the run before its next step with
  `errors.FilesystemError` naming the step, the cause and the last complete checkpoint,
  which is left intact for a rerun to resume from (the failed step's partial files are
  cleared away).
  """
  workdir = writable_directory(workdir, "workdir")
  t = config.train
  evaluations = Evaluations(workdir, t.best_metric)
  mngr = checkpoint_manager(workdir, config, keep_step=lambda: evaluations.best_step)

  with preemption.handling_signals():
    # Every process tells JAX's preemption sync the step it starts from before anything
    # slow (compiling, restoring), so a notice that comes meanwhile still finds one step
    # all of them reach.
    preemption.should_stop(mngr.latest_step() or 0)
    run = _set_up_or_restore(config, workdir, mngr, evaluations, data_iter, evaluate_fn,
                             mesh, tracker)
    stopped = False
    try:
      run.catch_up_on_resume()
      while run.step < t.total_steps and (stop_after is None
                                          or run.step - run.first < stop_after):
        if preemption.should_stop(run.step):
          stopped = True
          break
        run.check_saves()  # Never a step after a checkpoint that failed.
        run.train_step(next(run.batches))
        if run.step == t.total_steps:
          # Before the last checkpoint: a run stopped after it still finds this file.
          _finish_train_metrics(workdir, t.total_steps, run.last_metrics, run.is_main)
        if (run.step % t.checkpoint_every == 0 or run.step == t.total_steps
            or run.is_eval_step(run.step)):
          run.save()
        if run.is_eval_step(run.step):
          run.evaluate(run.step)
    except preemption.Interrupted:
      stopped = True  # A signal during an evaluation: its step's checkpoint is written.
    except BaseException as error:
      run.save_on_error(error)
      raise
    run.finish()
  if stopped:
    raise run.preempted()
  return run.state, run.last_metrics


def _set_up_or_restore(config, workdir, mngr, evaluations, data_iter, evaluate_fn, mesh,
                       tracker) -> _TrainingRun:
  """The model, step and input pipeline of `config`; the state restored from this
  workdir's latest checkpoint, else initialised from `init_from`, else random."""
  t = config.train
  is_main = distributed.is_main_process()
  _, mesh, state, shardings, step_fn = setup(config, mesh)
  if data_iter is None:
    data_iter = data_lib.make_train_iterator(config.data, t.batch_size, t.seed)
  reader = data_iter
  checkpointable_iter = data_iter if hasattr(data_iter, "get_state") else None
  to_device = functools.partial(global_batch, mesh=mesh)
  prefetcher = None
  if t.prefetch:
    batches = prefetcher = DevicePrefetch(data_iter, to_device, t.prefetch)
    checkpointable_iter = prefetcher if checkpointable_iter is not None else None
  else:
    batches = map(to_device, data_iter)  # Lazy: each batch read when the loop asks.

  restored, restored_step = restore_latest(mngr, state, shardings, checkpointable_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from %s at step %d", mngr.directory, restored_step)
  elif config.init_from:
    params, kept = pretrained.init_from(jax.device_get(state.params), config.init_from)
    state = state.replace(params=jax.device_put(params, shardings.params))
    logging.info("initialised from %s (%d parameters kept their init)", config.init_from,
                 len(kept))
  if is_main:
    with errors.writing(workdir / "config.json"):
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  first = int(state.step)
  if tracker is None:
    tracker = tracking.open_tracker(config, workdir, job_type="train")
  progress = Progress(workdir, t.total_steps, first, t.log_every, t.batch_size, is_main,
                      tracker=tracker)
  if config.data.get("on_error", "raise") == "skip" and hasattr(reader, "skipped_records"):
    # The bad records this process's pipeline left out so far (read-ahead included).
    progress.counters["skipped_records"] = lambda: reader.skipped_records
  return _TrainingRun(
      config=config, workdir=workdir, is_main=is_main, mngr=mngr, evaluations=evaluations,
      evaluate_fn=evaluate_fn, mesh=mesh, step_fn=step_fn, reader=reader, batches=batches,
      checkpointable_iter=checkpointable_iter, prefetcher=prefetcher, progress=progress,
      state=state, restored=restored is not None, first=first, step=first,
      saved_at=first if restored is not None else None)


@dataclasses.dataclass
class _TrainingRun:
  """What one call of `train` works with, and what its steps change (state, step, the
  last logged metrics, the step of the last checkpoint and of the one being written)."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  is_main: bool
  mngr: Any  # ocp.CheckpointManager
  evaluations: Evaluations
  evaluate_fn: Optional[Callable[[Any, int], dict]]
  mesh: Any
  step_fn: Callable
  reader: Any  # The per-host records' iterator (its counts go into the log).
  batches: Iterator  # Global device batches.
  checkpointable_iter: Any  # What is saved with the state for the data to resume, or None.
  prefetcher: Optional[DevicePrefetch]
  progress: Progress
  state: TrainState
  restored: bool
  first: int  # The step this call started from.
  step: int
  saved_at: Optional[int]  # The step of the last save started.
  last_metrics: Optional[dict] = None
  saving: Optional[int] = None  # The step of a save not yet known to be complete.

  def is_eval_step(self, s: int) -> bool:
    t = self.config.train
    return self.evaluate_fn is not None and s > 0 and (
        s % t.eval_every == 0 or s == t.total_steps)

  def catch_up_on_resume(self):
    """A resumed run first evaluates its step if the run before stopped during that
    evaluation; resumed at `total_steps`, it only checks for train_metrics.json."""
    if not self.restored:
      return
    if self.is_eval_step(self.first) and not self.evaluations.done(self.first):
      logging.info("step %d was checkpointed but not evaluated: evaluating it first",
                   self.first)
      self.evaluate(self.first)
    if self.first == self.config.train.total_steps:
      _finish_train_metrics(self.workdir, self.first, None, self.is_main)

  def train_step(self, batch):
    if self.step == self.first:
      self._describe_first_step(batch)
    self.state, metrics = self.step_fn(self.state, batch)
    self.step += 1
    self.last_metrics = self.progress.update(self.step, metrics) or self.last_metrics

  def _describe_first_step(self, batch):
    """Logs the model's size, the data, the mesh and the compiled step's cost; then waits
    for every process (the step is the first collective)."""
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))
    logging.info("train step of %s parameters on %s training records, mesh %s (%d "
                 "devices: %s; %d processes): %s", f"{n_params:,}",
                 _count(getattr(self.reader, "num_records", None)), dict(self.mesh.shape),
                 self.mesh.size, describe_devices(self.mesh), jax.process_count(),
                 describe_compiled_step(self.step_fn, self.state, batch))
    distributed.align("first train step")

  def save(self):
    self.progress.check_finite(self.step)
    self._start_save()

  def _start_save(self, force: bool = False):
    self.wait_for_save()  # Orbax waits for the previous save anyway: its failure is its own.
    step = int(self.state.step)
    try:
      save_checkpoint(self.mngr, self.state, self.checkpointable_iter, force=force)
    except Exception as e:  # A synchronous save, or the start of one, that failed.
      self._save_failed(step, e)
    self.saving = self.saved_at = step

  def check_saves(self):
    """Before each step: a save that failed in the background (a full disk) stops the run
    here, at the last complete checkpoint. One process checks at every step (a look at a
    flag); several check together at the log steps (a collective: the same step on all)."""
    if self.saving is None:
      return
    if jax.process_count() == 1:
      error = save_error(self.mngr)
      if error is None and not self.mngr.is_saving_in_progress():
        self.saving = None
    else:
      if self.step % self.config.train.log_every:
        return
      error = save_error(self.mngr)
      if not failed_on_any_process(error is not None):
        return
      error = error or save_error(self.mngr, wait=True) or errors.CheckpointError(
          f"another process could not write checkpoint step {self.saving}")
    if error is not None:
      self._save_failed(self.saving, error)

  def wait_for_save(self):
    """Blocks until the save in flight is complete; raises as `check_saves` if it failed."""
    if self.saving is not None:
      error = save_error(self.mngr, wait=True)
      if error is not None:
        self._save_failed(self.saving, error)
      self.saving = None

  def _save_failed(self, step: int, error: Exception):
    """Clears away the partial checkpoint of `step` and raises `error`, in one line naming
    the step, the cause and the last complete checkpoint where it is a filesystem's
    refusal (else as it is: a bug keeps its traceback)."""
    self.saving = None
    discard_failed_save(self.mngr, step)
    try:
      self.evaluations.forget(step, epath.Path(self.mngr.directory))
    except errors.FilesystemError as refused:  # The same full disk: the line below says it.
      logging.warning("%s", refused)
    translated = errors.filesystem_error(
        error, what=f"checkpoint step {step} could not be written to "
        f"{self.mngr.directory}/{step}")
    if translated is None:
      raise error
    latest = self.mngr.latest_step()
    kept = (f"the last complete checkpoint is step {latest} ({self.mngr.directory}/{latest}), "
            "where a rerun resumes") if latest is not None else (
            "no checkpoint is complete: a rerun starts from the beginning")
    raise errors.FilesystemError(
        f"{translated}; training stopped at step {self.step}, {kept}",
        code=translated.errno, path=translated.path, reason=translated.reason) from error

  def evaluate(self, s: int):
    logging.info("evaluating step %d", s)
    with errors.writing(self.workdir / "eval"):  # Where its results go.
      scalars = self.evaluate_fn(self.state.params, s)
    self.progress.write_scalars(s, scalars, prefix="eval")
    if self.evaluations.add(s, scalars, epath.Path(self.mngr.directory)):
      logging.info("best checkpoint so far: step %d, %s=%.4f (%s/%d)", s,
                   self.evaluations.metric, self.evaluations.score(scalars),
                   self.mngr.directory, s)

  def finish(self):
    """The last step's checkpoint, complete on every process; the pipeline and the
    progress closed."""
    try:
      if self.saved_at is None or self.step > self.saved_at:
        self._start_save(force=True)
      # Blocks until the (async) checkpoint is complete on every process. Signals arriving
      # meanwhile only set the flag again.
      self.wait_for_save()
    finally:
      self.close()

  def save_on_error(self, error: BaseException):
    """An error (a bad record): keeps the work done so far, unless it is a diverged state
    or the filesystem refused a write (a full disk, a read-only folder: another
    checkpoint would fail too); then closes the pipeline and the progress."""
    try:
      if not isinstance(error, (NonFiniteLoss, errors.FilesystemError)) and (
          self.saved_at is None or int(self.state.step) > self.saved_at):
        logging.warning("stopped by an error at step %d: saving a checkpoint first",
                        int(self.state.step))
        self._start_save(force=True)
      self.wait_for_save()
    except Exception as failed:  # E.g. the failed step had consumed its donated state.
      refused = errors.filesystem_error(error)
      if (refused is not None and isinstance(failed, errors.FilesystemError)
          and failed.errno == refused.errno):
        # One refusal (a full disk) met by another write first and by the checkpoint in
        # flight: the checkpoint's line names the step lost and the last complete one.
        self.close()
        raise failed from error
      logging.error("could not save the interrupted state (%s); the last checkpoint is "
                    "step %s", errors.filesystem_error(failed) or failed,
                    self.mngr.latest_step())
    self.close()

  def preempted(self) -> preemption.Preempted:
    """What a run stopped by a signal raises, once its checkpoint is complete."""
    return preemption.Preempted(self.step, preemption.reason(),
                                f"{self.mngr.directory}/{self.step}")

  def close(self, timeout: float = 30.0):
    if self.prefetcher is not None:
      self.prefetcher.close(timeout)
    self.progress.close(timeout)


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
