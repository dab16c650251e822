"""`--plan`: what a training step keeps, traced on the host without running anything.

Parameters, gradients and optimizer state, and the activations the loss's forward keeps
for the backward pass (jax's saved residuals) without remat and under each
`model.remat_policy`, at a given batch: for planning a GPU's batch on a laptop.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from benchmarks.measure import with_batch
from mlseg_jax import optimizer as optim_lib
from mlseg_jax.models.decoders import compute_losses
from mlseg_jax.models.segmenter import abstract_params, build_model
from mlseg_jax.models.vit import REMAT_POLICIES

_SHORT_DTYPE_BYTES = {"bool": 1, "pred": 1}


def aval_bytes(short: str) -> int:
  """Bytes of an abstract value printed the short way, e.g. 'bf16[8,1025,768]'."""
  dtype, _, dims = short.partition("[")
  dims = dims.rstrip("]")
  count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
  if dtype in _SHORT_DTYPE_BYTES:
    return count * _SHORT_DTYPE_BYTES[dtype]
  bits = int("".join(ch for ch in dtype if ch.isdigit()) or 0)
  if not bits:
    raise ValueError(f"cannot size {short!r}")
  return count * max(bits // 8, 1)


@contextlib.contextmanager
def flash_attention_standin():
  """Within this context, `jax.nn.dot_product_attention(..., implementation="cudnn")` is
  traceable without a GPU; on leaving it (exception or not) the real function is back.

  The model calls `jax.nn.dot_product_attention` with `implementation=model.attention_impl`,
  and cuDNN's kernel cannot be traced without a GPU. The stand-in is XLA attention behind a
  custom VJP that keeps what flash attention keeps for the backward pass -- q, k, v, the
  output and per-row softmax statistics -- instead of the (B, heads, N, N) probabilities.
  Calls for another implementation, or with a bias or a mask, go to the real function."""
  real = jax.nn.dot_product_attention

  @jax.custom_vjp
  def flash(q, k, v, lengths):
    return real(q, k, v, implementation="xla", key_value_seq_lengths=lengths)

  def flash_fwd(q, k, v, lengths):
    out = flash(q, k, v, lengths)
    # Flash attention's other residual, per-row softmax statistics: only its size matters
    # here (computing it would put dots in the forward that a remat policy could keep).
    stats = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)  # (B, heads, T)
    return out, (q, k, v, lengths, out, stats)

  def flash_bwd(res, g):
    q, k, v, lengths, _, _ = res
    _, vjp = jax.vjp(lambda q, k, v: real(q, k, v, implementation="xla",
                                          key_value_seq_lengths=lengths), q, k, v)
    return (*vjp(g), None)

  flash.defvjp(flash_fwd, flash_bwd)

  def standin(query, key, value, bias=None, mask=None, *, implementation=None,
              key_value_seq_lengths=None, **kwargs):
    if implementation != "cudnn" or bias is not None or mask is not None or kwargs:
      return real(query, key, value, bias, mask, implementation=implementation,
                  key_value_seq_lengths=key_value_seq_lengths, **kwargs)
    if key_value_seq_lengths is None:
      key_value_seq_lengths = jnp.full((query.shape[0],), key.shape[1], jnp.int32)
    return flash(query, key, value, key_value_seq_lengths)

  jax.nn.dot_product_attention = standin
  try:
    yield
  finally:
    jax.nn.dot_product_attention = real


def saved_activation_bytes(config, batch: int) -> int:
  """Bytes the training loss's forward keeps for its backward pass at `batch` images
  (jax's saved residuals, the parameters and the batch excluded): what `model.remat` and
  `model.remat_policy` trade against recomputation. Traced with abstract inputs: no device
  memory is touched. A lower bound of the step's activation memory: the backward's own
  temporaries (one block's recomputation, gradients in flight) come on top."""
  model = build_model(config.model)
  h, w = config.data.crop_size

  def loss(p):
    images, labels = jnp.zeros((batch, h, w, 3)), jnp.zeros((batch, h, w), jnp.int32)
    out = model.apply({"params": p}, images, train=True, labels=labels,
                      rngs={"dropout": jax.random.PRNGKey(0)})
    return compute_losses(out, labels, config.model)[0]

  printed = io.StringIO()
  with flash_attention_standin():
    params = abstract_params(config.model)
    with contextlib.redirect_stdout(printed):
      print_saved_residuals(loss, params)
  total = 0
  for line in printed.getvalue().splitlines():
    if not line.strip() or "from the argument" in line:
      continue  # The parameters are counted apart.
    total += aval_bytes(line.split()[0])
  return total


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def plan(config, batch: int) -> dict[str, Any]:
  """Training memory at global batch `batch` on one device, by parts: parameters,
  optimizer state, and the saved activations without remat and with each remat policy."""
  config = with_batch(config, batch)
  with flash_attention_standin():
    params = abstract_params(config.model)
  tx, _ = optim_lib.make_optimizer(config.optim, params, config.train.total_steps)
  opt_state = jax.eval_shape(tx.init, params)
  result = {"batch": batch, "params_bytes": tree_bytes(params),
            "opt_state_bytes": tree_bytes(opt_state), "activations_bytes": {}}
  variants = [("none", False, config.model.remat_policy)]
  variants += [(name, True, name) for name in REMAT_POLICIES]
  for label, remat, policy in variants:
    c = config.copy_and_resolve_references()
    c.model.remat, c.model.remat_policy = remat, policy
    result["activations_bytes"][label] = saved_activation_bytes(c, batch)
  return result
