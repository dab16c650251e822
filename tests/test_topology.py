"""A checkpoint written on one mesh restores on another, and training continues."""

import jax
import numpy as np
import pytest

from mlseg_jax import sharding as sharding_lib
from mlseg_jax import checkpoints
from mlseg_jax import train
from test_train import random_batches, tiny_train_config


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("topology")
  config = tiny_train_config(decoder="mask_transformer")
  config.mesh.data, config.mesh.fsdp, config.mesh.min_fsdp_size = 4, 2, 4096
  mesh = sharding_lib.make_mesh(config.mesh)
  _, mesh, state, _, step_fn = train.setup(config, mesh)
  batches = random_batches(5)
  for _ in range(3):
    state, _ = step_fn(state, train.global_batch(next(batches), mesh))
  mngr = checkpoints.checkpoint_manager(workdir, config)
  checkpoints.save_checkpoint(mngr, state)
  mngr.wait_until_finished()
  return workdir, jax.device_get(state.params), next(batches)


# Written on 8 devices as data 4 x fsdp 2; read on 1 and 2 devices (replicated) and on 4
# devices as fsdp 4 (another parameter layout).
@pytest.mark.parametrize("devices,data,fsdp", [(1, 1, 1), (2, 2, 1), (4, 1, 4)])
def test_restore_on_another_topology_and_continue(saved_on_8_devices, devices, data, fsdp):
  workdir, saved_params, batch = saved_on_8_devices
  config = tiny_train_config(decoder="mask_transformer")
  config.mesh.data, config.mesh.fsdp, config.mesh.min_fsdp_size = data, fsdp, 4096
  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:devices])
  _, mesh, state, shardings, step_fn = train.setup(config, mesh)
  mngr = checkpoints.checkpoint_manager(workdir, config)
  restored = checkpoints.restore_checkpoint(mngr, state, shardings)
  assert int(restored.step) == 3
  kernel = restored.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.devices.size == devices
  if fsdp > 1:
    assert "fsdp" in kernel.sharding.spec
  for a, b in zip(jax.tree_util.tree_leaves(saved_params),
                  jax.tree_util.tree_leaves(jax.device_get(restored.params))):
    np.testing.assert_array_equal(a, b)
  state, metrics = step_fn(restored, train.global_batch(batch, mesh))
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))
