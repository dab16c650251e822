"""benchmarks/: the FLOP and MFU arithmetic against hand counts, the batch sweep, XLA's
analyses on every backend shape, the memory plan, and one end-to-end run of the command on
the CPU."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, tiny_model_config
from benchmarks import bench, flops, measure, memory_plan


def tiny_config(decoder="linear", crop=(32, 48), **model):
  from mlseg_jax.configs.common import get_base_config

  config = get_base_config()
  config.unlock()
  config.model = tiny_model_config(decoder=decoder, num_classes=5, img_size=crop, **model)
  config.lock()
  config.data.crop_size = crop
  return config


# ---------------------------------------------------------------------------------------
# Hand counts. Every matmul written out as 2 x M x K x N.


def test_mfu_of_one_dense_layer_against_a_hand_count():
  # A Dense layer 8 -> 16 on 4 inputs: 2*4*8*16 = 1024 FLOPs forward, 3072 for training.
  train_flops = 3 * 2 * 4 * 8 * 16
  assert train_flops == 3072
  # 3072 FLOPs in 1 us = 3.072e9 FLOP/s = 0.003072 TFLOP/s; against a 0.01 TFLOP/s peak
  # that is 30.72 %; the same work on 2 devices is half of that per device.
  assert flops.achieved_tflops(train_flops, 1e-6) == pytest.approx(0.003072)
  assert flops.mfu(train_flops, 1e-6, 0.01) == pytest.approx(0.3072)
  assert flops.mfu(train_flops, 1e-6, 0.01, num_devices=2) == pytest.approx(0.1536)
  with pytest.raises(ValueError, match="peak_tflops"):
    flops.mfu(train_flops, 1e-6, 0.0)
  with pytest.raises(ValueError, match="seconds"):
    flops.achieved_tflops(train_flops, 0.0)

  # XLA's own count of that layer, through the same helper the benchmark uses.
  compiled = jax.jit(lambda x, w: x @ w).lower(jnp.ones((4, 8)), jnp.ones((8, 16))).compile()
  assert measure.xla_flops(compiled) == 1024


def _block(n, d, f):
  """One transformer block, matmul by matmul (n tokens, width d, MLP width f)."""
  qkv = 2 * n * d * (3 * d)
  logits = 2 * n * n * d  # all heads together: (n x d/h) @ (d/h x n), h times
  values = 2 * n * n * d
  proj = 2 * n * d * d
  fc1, fc2 = 2 * n * d * f, 2 * n * f * d
  return qkv + logits + values + proj + fc1 + fc2


def test_model_flops_of_a_tiny_vit_with_a_linear_decoder_against_a_hand_count():
  # Width 64, depth 2, 4 heads, patch 16 on a 32x48 crop: a 2x3 grid, 6 patches + [CLS].
  config = tiny_config("linear", crop=(32, 48))
  patch_embedding = 2 * 6 * (16 * 16 * 3) * 64
  blocks = 2 * (2 * 7 * 64 * 192 + 2 * 7 * 7 * 64 + 2 * 7 * 7 * 64 + 2 * 7 * 64 * 64
                + 2 * 7 * 64 * 256 + 2 * 7 * 256 * 64)
  assert blocks == 2 * _block(7, 64, 256) == 1_401_344
  head = 2 * 6 * 64 * 5  # tokens -> 5 classes
  # Logits (2, 3, 5) -> (32, 48, 5): rows (32 x 2) @ (2 x 3*5), then columns
  # (48 x 3) @ (3 x 32*5).
  upsample = 2 * 32 * 2 * (3 * 5) + 2 * 48 * 3 * (32 * 5)
  forward = patch_embedding + blocks + head + upsample
  assert forward == 2_043_008
  assert flops.flop_breakdown(config) == {
      "patch_embedding": patch_embedding, "vit_blocks": blocks, "decoder": head,
      "masks": 0, "upsample": upsample}
  assert flops.model_flops(config, 2) == 3 * 2 * forward
  assert flops.model_flops(config, 2, train=False) == 2 * forward

  # MFU of a 2-image step taking 1 ms against a 1 TFLOP/s peak.
  assert flops.mfu(flops.model_flops(config, 2), 1e-3, 1.0) == pytest.approx(
      6 * 2_043_008 / 1e-3 / 1e12)


def test_model_flops_of_the_mask_transformer_and_mlseg_heads_against_hand_counts():
  vit = 2 * 6 * 768 * 64 + 2 * _block(7, 64, 256)
  # Mask transformer, d_model 32, 1 block, d_ff 64: 6 patches + 5 class tokens.
  config = tiny_config("mask_transformer", crop=(32, 48), d_model=32, n_heads=4, d_ff=64,
                       n_layers=1)
  b = flops.flop_breakdown(config)
  assert b["patch_embedding"] + b["vit_blocks"] == vit
  assert b["decoder"] == 2 * 6 * 64 * 32 + _block(6 + 5, 32, 64)
  assert b["masks"] == 2 * 6 * 32 * 32 + 2 * 5 * 32 * 32 + 2 * 6 * 5 * 32

  # MLSeg, 2 blocks (block 0 = multi-label branch over a 1x1 pooled token), top-2 of 5.
  config = tiny_config("mlseg", crop=(32, 48), d_model=32, n_heads=4, d_ff=64, n_layers=2,
                       topk=2, pool_grid=1)
  b = flops.flop_breakdown(config)
  proj_dec = 2 * 6 * 64 * 32 + 2 * 1 * 64 * 32  # patch tokens, then the pooled token
  block0 = _block(1 + 5, 32, 64)
  group_wise_linear = 2 * 5 * 32
  segmentation = _block(6 + 2, 32, 64)
  assert b["decoder"] == proj_dec + block0 + group_wise_linear + segmentation
  assert b["masks"] == 2 * 6 * 32 * 32 + 2 * 2 * 32 * 32 + 2 * 6 * 2 * 32
  # Training upsamples the k = 2 rank slots the loss reads; evaluation all 5 classes.
  assert b["upsample"] == 2 * 2 * (32 * 2 * 3 + 32 * 48 * 3)
  assert flops.flop_breakdown(config, train=False)["upsample"] == 2 * 5 * (32 * 2 * 3
                                                                             + 32 * 48 * 3)
  # pool_grid = 0: block 0 sees every patch token, no pooled projection.
  config.model.pool_grid = 0
  b0 = flops.flop_breakdown(config)
  assert b0["decoder"] == 2 * 6 * 64 * 32 + _block(6 + 5, 32, 64) + group_wise_linear \
      + segmentation


def test_model_flops_counts_oce_class_tokens_from_their_start_layer():
  config = tiny_config("mask_transformer", crop=(32, 48), oce=True, oce_start_layer=1)
  b = flops.flop_breakdown(config)
  assert b["vit_blocks"] == _block(7, 64, 256) + _block(7 + 5, 64, 256)


def test_the_analytic_count_is_the_matmul_part_of_xlas_count():
  # XLA counts elementwise work too: its count is higher, but not by much.
  from mlseg_jax.models.segmenter import build_model

  config = tiny_config("linear", crop=(32, 48))
  model = build_model(config.model)
  images = jnp.zeros((2, 32, 48, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))["params"]
  forward = measure.make_eval_forward(model, (32, 48), with_labels=False)
  xla = measure.xla_flops(forward.lower(params, images, None).compile())
  analytic = flops.model_flops(config, 2, train=False)
  assert 0.75 * xla < analytic <= xla


# ---------------------------------------------------------------------------------------
# The largest batch, XLA's analyses, the command line.


def test_largest_fitting_batch_doubles_until_oom_then_bisects():
  calls = []

  def fits(b):
    calls.append(b)
    return b <= 40

  largest, tried = measure.largest_fitting_batch(fits, 4, 1024, granularity=4)
  assert largest == 40
  assert calls[:5] == [4, 8, 16, 32, 64]  # doubling
  assert calls[5:] == [48, 40, 44]  # bisecting 32..64 down to a gap of 32 / 8
  assert tried == {4: True, 8: True, 16: True, 32: True, 64: False, 48: False, 40: True,
                   44: False}
  assert measure.largest_fitting_batch(lambda b: False, 8, 64) == (None, {8: False})
  assert measure.largest_fitting_batch(lambda b: True, 8, 20)[0] == 16  # capped by the limit
  with pytest.raises(ValueError, match="multiple of 8"):
    measure.largest_fitting_batch(fits, 4, 64, granularity=8)


def test_out_of_memory_is_told_from_other_errors():
  oom = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26.00GiB.")
  assert measure.is_out_of_memory(oom)
  assert not measure.is_out_of_memory(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes"))
  assert not measure.is_out_of_memory(ValueError("batch 7 is not divisible by 8"))


class _Compiled:
  def __init__(self, cost=None, memory=None, raises=False):
    self.cost, self.memory, self.raises = cost, memory, raises

  def cost_analysis(self):
    if self.raises:
      raise NotImplementedError("no cost analysis on this backend")
    return self.cost

  def memory_analysis(self):
    if self.raises:
      raise NotImplementedError("no memory analysis on this backend")
    return self.memory


class _Memory:
  argument_size_in_bytes = 100
  output_size_in_bytes = 60
  alias_size_in_bytes = 50
  temp_size_in_bytes = 30
  generated_code_size_in_bytes = 7


def test_xla_analyses_take_dicts_lists_and_none():
  assert measure.xla_flops(_Compiled({"flops": 12.0})) == 12.0
  assert measure.xla_flops(_Compiled([{"flops": 12.0}, {"flops": 3.0}])) == 15.0
  assert measure.xla_flops(_Compiled([{}])) is None
  assert measure.xla_flops(_Compiled(None)) is None
  assert measure.xla_flops(_Compiled({"flops": -1.0})) is None
  assert measure.xla_flops(_Compiled(raises=True)) is None
  mem = measure.xla_memory(_Compiled(memory=_Memory()))
  assert mem == {"argument": 100, "output": 60, "alias": 50, "temp": 30,
                 "generated_code": 7, "total": 100 + 60 - 50 + 30}
  assert measure.xla_memory(_Compiled(memory=[_Memory()]))["total"] == 140
  assert measure.xla_memory(_Compiled(memory=None)) is None
  assert measure.xla_memory(_Compiled(raises=True)) is None


def test_command_line_spellings():
  argv = ["bench", "--sweep-batch", "--no-torch", "--eval-batch=4", "--notorch",
          "--config.model.remat=True", "--config", "configs/quickstart.py"]
  assert bench.normalise_argv(argv) == [
      "bench", "--sweep_batch", "--notorch", "--eval_batch=4", "--notorch",
      "--config.model.remat=True", "--config", "configs/quickstart.py"]


# ---------------------------------------------------------------------------------------
# End to end.

TINY_OVERRIDES = [
    "--config.model.backbone_width=64", "--config.model.backbone_depth=2",
    "--config.model.backbone_heads=4", "--config.model.d_model=64",
    "--config.model.n_heads=4", "--config.model.d_ff=256", "--config.model.n_layers=2",
    "--config.model.img_size=64,64", "--config.data.crop_size=64,64",
    "--config.data.test_scale=120,90", "--config.eval.stride=64,64",
    "--config.model.topk=4", "--config.model.pool_grid=2",
]


def test_the_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", "benchmarks.bench", "--config", "configs/quickstart.py",
         "--batch", "2", "--steps", "2", "--warmup", "1", "--eval-images", "1",
         "--matmul_size", "128", "--copy_mib", "4", "--json", str(out),
         "--profile", str(tmp_path / "profile")] + TINY_OVERRIDES
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout
  for text in ("device: 2 x cpu", "MFU xla", "MFU model", "train step", "eval forward",
               "eval sliding window:", "torch peer:", "peak: matmul bf16",
               "busiest operations:"):
    assert text in table, table

  r = json.loads(out.read_text())
  assert r["device"] == {"platform": "cpu", "kind": "cpu", "count": 2, "processes": 1}
  assert r["config"]["decoder"] == "mlseg" and r["config"]["width"] == 64
  assert r["config"]["file"] == "configs/quickstart.py"
  for phase in ("train", "eval"):
    res = r[phase]
    for key in ("compile_s", "xla_flops", "analytic_flops", "memory", "timing",
                "images_per_s", "images_per_s_per_device", "tflops_model", "mfu_model",
                "tflops_xla", "mfu_xla"):
      assert key in res, (phase, key)
    assert res["timing"]["n"] == 2 and res["batch"] == 2
    assert res["images_per_s_per_device"] == pytest.approx(res["images_per_s"] / 2)
  assert r["train"]["analytic_flops"] == flops.model_flops(_cli_config(), 2)
  assert "loop_step_s" in r["train"] and "loss" in r["train"]
  prof = r["train"]["profile"]
  assert prof["steps"] == measure.PROFILE_STEPS and prof["scope"] == "host"
  assert prof["top"] and prof["top"][0]["ms_per_step"] > 0
  assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert "device_peak_bytes" in r["train"]  # None where the backend keeps no allocator stats
  assert "device_peak_bytes_so_far" in r["eval"]
  for key in ("argument", "output", "temp", "generated_code", "total"):
    assert key in r["train"]["memory"]
  for key in ("matmul_bfloat16", "matmul_float32", "tflops", "copy"):
    assert key in r["peak"]
  assert r["peak"]["matmul_bfloat16"]["n"] == 128
  assert set(r["flop_breakdown"]["train_forward_per_image"]) == {
      "patch_embedding", "vit_blocks", "decoder", "masks", "upsample"}
  sliding = r["eval_sliding"]
  assert "images_per_s" in sliding or "skipped" in sliding
  peer = r["torch"]
  if "skipped" not in peer:  # torch + timm installed (they are in CI)
    assert peer["compiled"] is False and peer["notes"]  # eager on the CPU, and said so
    assert peer["sdpa_attention"] is True
    assert "ours_over_torch_backbone" in peer and "ours_step_over_torch_backbone" in peer
    assert "backbone" in r and "mfu_model" in r["backbone"]


def _cli_config():
  """The quickstart config with TINY_OVERRIDES applied, as the command line sees it."""
  import importlib

  config = importlib.import_module("mlseg_jax.configs.quickstart").get_config()
  for flag in TINY_OVERRIDES:
    path, value = flag[len("--config."):].split("=")
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(int(v) for v in value.split(",")) if "," in value else int(value)
  return config


# ---------------------------------------------------------------------------------------
# Memory plan.


def test_aval_bytes_reads_jaxs_short_spelling():
  assert memory_plan.aval_bytes("bf16[8,1025,768]") == 8 * 1025 * 768 * 2
  assert memory_plan.aval_bytes("f32[2,3]") == 24
  assert memory_plan.aval_bytes("bool[4,4]") == 16
  assert memory_plan.aval_bytes("i32[]") == 4
  with pytest.raises(ValueError, match="cannot size"):
    memory_plan.aval_bytes("token[]")


def test_saved_activations_by_hand_for_a_tiny_vit():
  # Without remat the linear decoder's loss keeps, per ViT block, a handful of (B, N, D)
  # and (B, N, 4D) tensors; with full remat only each block's input: B x N x D floats per
  # block, N = 1 + 2 x 3 patches (32 x 48 crop).
  config = tiny_config("linear", backbone_depth=2, dropout=0.0, drop_path_rate=0.0,
                       remat=True, remat_policy="nothing_saveable")
  full = memory_plan.saved_activation_bytes(config, 2)
  config.model.remat = False
  none = memory_plan.saved_activation_bytes(config, 2)
  block_inputs = 2 * (2 * 7 * 64 * 4)  # depth x (B x N x D float32)
  assert full >= block_inputs
  assert none > full + 2 * (2 * 7 * 256 * 4)  # at least the fc1 outputs come on top


def test_remat_policies_keep_less_and_compute_the_same_gradients():
  from mlseg_jax.models.decoders import compute_losses
  from mlseg_jax.models.segmenter import build_model

  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 48, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, 32, 48), -1, 5)
  grads, saved = {}, {}
  for name, remat, policy in [("none", False, "nothing_saveable"),
                              ("dots", True, "dots_with_no_batch_dims_saveable"),
                              ("full", True, "nothing_saveable")]:
    config = tiny_config("mask_transformer", remat=remat, remat_policy=policy)
    model = build_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(2), images)["params"]

    def loss(p):
      out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
      return compute_losses(out, labels, config.model)[0]

    grads[name] = jax.jit(jax.grad(loss))(params)
    saved[name] = memory_plan.saved_activation_bytes(config, 2)
  assert saved["none"] > saved["dots"] > saved["full"]
  for name in ("dots", "full"):
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[name])):
      assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_unknown_remat_policy_is_refused():
  from mlseg_jax.models.segmenter import build_model

  with pytest.raises(ValueError, match="model.remat_policy='everything'"):
    build_model(tiny_config(remat=True, remat_policy="everything").model)


def test_decoder_attention_with_dropout_keeps_no_quadratic_float_tensor():
  # The decoder trains with dropout on its attention probabilities; they are recomputed in
  # the backward pass, so no float of shape (B, heads, N, N) is kept: only the keep mask,
  # a byte per entry, which costs more to draw again than to keep.
  from jax.ad_checkpoint import print_saved_residuals
  import contextlib
  import io

  from mlseg_jax.models import vit

  attn = vit.SelfAttention(num_heads=2, dropout=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 50, 16))
  params = attn.init(jax.random.PRNGKey(1), x, train=False)["params"]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(
        lambda p: attn.apply({"params": p}, x, train=True,
                             rngs={"dropout": jax.random.PRNGKey(2)}).sum(), params)
  quadratic = [line for line in printed.getvalue().splitlines() if "50,50]" in line]
  assert quadratic and all(line.startswith("bool[3,2,50,50]") for line in quadratic), (
      printed.getvalue())
  assert "[3,50," in printed.getvalue()  # q, k, v and the like are kept


def test_the_memory_plan_command(tmp_path):
  out = tmp_path / "plan.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.bench", "--config", "configs/quickstart.py",
         "--batch", "4", "--plan", "--json", str(out)] + TINY_OVERRIDES
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "memory plan:" in proc.stdout and "| nothing_saveable |" in proc.stdout
  plan = json.loads(out.read_text())["plan"]
  assert plan["batch"] == 4
  act = plan["activations_bytes"]
  assert set(act) == {"none", "nothing_saveable", "dots_with_no_batch_dims_saveable",
                      "dots_saveable"}
  assert act["none"] > act["dots_with_no_batch_dims_saveable"] > act["nothing_saveable"] > 0
  config = _cli_config()
  from mlseg_jax.models.segmenter import abstract_params

  params = abstract_params(config.model)
  assert plan["params_bytes"] == sum(x.size * 4 for x in jax.tree.leaves(params))
  # AdamW: mu and nu, plus step counters.
  assert 2 * plan["params_bytes"] <= plan["opt_state_bytes"] < 2 * plan["params_bytes"] + 64


def test_the_flash_attention_standin_traces_cudnn_calls_and_restores_jax_nn():
  real = jax.nn.dot_product_attention
  q = jnp.ones((2, 5, 2, 8), jnp.bfloat16)  # (B, T, heads, Dh)
  with memory_plan.flash_attention_standin():
    assert jax.nn.dot_product_attention is not real
    out = jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q,
                                                                implementation="cudnn"), q)
    assert out.shape == q.shape
  assert jax.nn.dot_product_attention is real
  with pytest.raises(RuntimeError, match="inside"):
    with memory_plan.flash_attention_standin():
      raise RuntimeError("inside")
  assert jax.nn.dot_product_attention is real


def test_importing_the_benchmark_starts_no_jax_backend():
  # The torch peer runs before JAX takes the accelerator: no module of the command may
  # start a backend when imported. An unknown platform fails at the first backend start.
  env = dict(os.environ, JAX_PLATFORMS="no_such_platform")
  code = "import benchmarks.bench, jax; print(jax.__version__)"
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
