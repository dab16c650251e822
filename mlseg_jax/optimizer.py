"""The reference recipe's optimizer (REFERENCE.md §5) as optax transformations.

SGD (momentum 0.9, PyTorch's form: coupled weight decay added to the gradient before the
momentum buffer) or AdamW, the poly learning-rate decay of mmcv, and mmcv's paramwise
weight-decay rules. Those rules match substrings of the REFERENCE's parameter names
(`backbone.layers.0.ln1.weight`, `decode_head.blocks.0.norm1.weight`, ...), with the
longest matching key winning, so our parameter paths are first spelled the reference's
way, by the converter's tables (`checkpoint_rules.reference_name`): e.g. "norm" must not
match our backbone's `norm1` (the reference's is `ln1`, which decays), and
"decode_head.blocks.0." must beat "norm" for block 0's norms.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlseg_jax.checkpoint_rules import reference_name


def decay_multipliers(params: Mapping[str, Any], custom_keys: Mapping[str, float]):
  """Tree of mmcv `decay_mult` values: the longest key contained in the name wins."""
  keys = sorted(sorted(custom_keys), key=len, reverse=True)

  def mult(path, _):
    name = reference_name(tuple(k.key for k in path))
    for key in keys:
      if key in name:
        return float(custom_keys[key])
    return 1.0

  return jax.tree_util.tree_map_with_path(mult, params)


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9,
                  min_lr: float = 1e-5, warmup_steps: int = 0):
  """mmcv's per-iteration poly: (base - min) * (1 - step / total) ** power + min."""

  def schedule(step):
    step = jnp.minimum(step, total_steps)
    lr = (base_lr - min_lr) * (1.0 - step / total_steps) ** power + min_lr
    if warmup_steps:
      lr = jnp.where(step < warmup_steps, lr * (step + 1) / warmup_steps, lr)
    return lr

  return schedule


class _DecayState(NamedTuple):
  pass


def add_decayed_weights_by(weight_decay: float, multipliers) -> optax.GradientTransformation:
  """updates += weight_decay * mult * params, with a per-parameter multiplier tree."""

  def init_fn(params):
    del params
    return _DecayState()

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("weight decay needs the parameters")
    updates = jax.tree_util.tree_map(
        lambda u, p, m: u + (weight_decay * m) * p if m else u, updates, params, multipliers)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "sgd"  # "sgd" (reference) or "adamw".
  c.lr = 0.001
  c.momentum = 0.9
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.power = 0.9
  c.min_lr = 1e-5
  c.warmup_steps = 0
  c.grad_clip_norm = 0.0  # 0: none, as the reference.
  # mmcv paramwise_cfg.custom_keys as (substring of the reference name, decay_mult) pairs
  # (a tuple: ConfigDict keys cannot hold the dots these keys have).
  c.decay_mult = (("pos_embed", 0.0), ("cls_token", 0.0), ("norm", 0.0))
  return c


def make_optimizer(c: ml_collections.ConfigDict, params, total_steps: int):
  """(optax transformation, lr schedule) for `config.optim` over `params`' tree."""
  # Checked first: naming the parameters raises for a tree that is not a model's.
  if c.name not in ("sgd", "adamw"):
    raise ValueError(f"optim.name={c.name!r} is not one of ('sgd', 'adamw')")
  schedule = poly_schedule(c.lr, total_steps, c.power, c.min_lr, c.warmup_steps)
  mults = decay_multipliers(params, dict(c.decay_mult))
  parts = []
  if c.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  if c.name == "sgd":
    if c.weight_decay:
      parts.append(add_decayed_weights_by(c.weight_decay, mults))
    parts.append(optax.trace(decay=c.momentum, nesterov=False))
  else:
    parts.append(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps))
    if c.weight_decay:
      parts.append(add_decayed_weights_by(c.weight_decay, mults))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
