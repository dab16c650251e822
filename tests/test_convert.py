"""Checkpoint conversion: round trips, coverage errors, Orbax files, and the CLI.

Parity of converted PyTorch models lives in test_convert_parity.py.
"""

import argparse
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from conftest import REPO, tiny_model_config
from mlseg_jax.data.datasets import QUICKSTART_DATA
from mlseg_jax import convert, pretrained
from mlseg_jax.convert import ConversionError

# Every head of REFERENCE.md §7, with and without OCE where the reference has it.
VARIANTS = {
    "mask_transformer": dict(decoder="mask_transformer"),
    "mask_transformer_oce": dict(decoder="mask_transformer", oce=True),
    "linear": dict(decoder="linear"),
    "mlseg": dict(decoder="mlseg", n_layers=3, topk=3),
    "mlseg_no_pool": dict(decoder="mlseg", n_layers=3, topk=3, pool_grid=0),
    "mlseg_oce": dict(decoder="mlseg", n_layers=3, topk=3, oce=True),
    "mlseg_trandec": dict(decoder="mlseg_trandec", topk=3),
    "mlseg_pooling": dict(decoder="mlseg_pooling", topk=3),
    "mlseg_gt": dict(decoder="mlseg_gt"),
}


def random_params(model_config, seed=0):
  """Every leaf distinct and random, so a swapped or transposed tensor cannot hide."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      convert.abstract_params(model_config))


def reference_state_dict(model_config, seed=0):
  params = random_params(model_config, seed)
  rules = convert.checkpoint_layout("reference", model_config).rules
  return params, convert.from_params(params, rules)


def _write_safetensors(tmp_path, state, name="ckpt.safetensors"):
  path = tmp_path / name
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                              str(path))
  return path


def _assert_trees_equal(a, b):
  fa, fb = convert.flatten(a), convert.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]),
                                  err_msg="/".join(path))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_params_to_reference_names_and_back_is_exact(variant):
  c = tiny_model_config(**VARIANTS[variant])
  params, state = reference_state_dict(c)
  # The reference's mmcv ViT names, its fused in_proj, and OCE's tokens in the backbone.
  assert state["backbone.layers.1.attn.attn.in_proj_weight"].shape == (3 * 64, 64)
  assert state["backbone.patch_embed.projection.weight"].shape == (64, 3, 16, 16)
  assert "backbone.ln1.weight" in state
  cls_emb = "backbone.cls_emb" if c.oce else "decode_head.cls_emb"
  assert (cls_emb in state) == (c.decoder != "linear" or c.oce)
  layout = convert.checkpoint_layout("reference", c)
  torch_state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  back = convert.to_params(torch_state, layout.rules, convert.abstract_params(c),
                           dropped=layout.dropped)
  _assert_trees_equal(back, params)


@pytest.mark.parametrize("decoder", ["mask_transformer", "linear"])
def test_round_trip_through_mmseg_names_is_exact(decoder):
  c = tiny_model_config(decoder)
  params = random_params(c, seed=1)
  layout = convert.checkpoint_layout("mmseg", c)
  state = convert.from_params(params, layout.rules)
  if decoder == "linear":
    assert state["decode_head.conv_seg.weight"].shape == (5, 64, 1, 1)
  else:
    assert state["decode_head.patch_proj.weight"].shape == (64, 64)
    assert "decode_head.layers.0.attn.attn.in_proj_bias" in state
  back = convert.to_params(state, layout.rules, convert.abstract_params(c))
  _assert_trees_equal(back, params)


def test_reference_checkpoint_file_converts_with_its_wrapper(tmp_path):
  c = tiny_model_config("mask_transformer", oce=True)
  params, state = reference_state_dict(c)
  path = tmp_path / "iter_40000.pth"
  torch.save({"meta": {"iter": 40000, "CLASSES": ("a", "b")},
              "state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
              "optimizer": {"state": {}, "param_groups": []}}, path)
  converted, not_filled = convert.convert_checkpoint("reference", path, c)
  assert not_filled == []
  _assert_trees_equal(converted, params)


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
  c = tiny_model_config("mask_transformer")
  _, state = reference_state_dict(c)
  missing = _write_safetensors(
      tmp_path, {k: v for k, v in state.items() if k != "decode_head.mask_norm.bias"},
      "missing.safetensors")
  with pytest.raises(ConversionError,
                     match=r"missing.safetensors.*\n.*missing key 'decode_head.mask_norm.bias'"):
    convert.convert_checkpoint("reference", missing, c)
  extra = _write_safetensors(tmp_path, dict(state, **{"decode_head.blocks.2.norm1.weight":
                                                      np.ones(64, np.float32)}))
  with pytest.raises(ConversionError, match="unexpected key 'decode_head.blocks.2.norm1.weight'"):
    convert.convert_checkpoint("reference", extra, c)
  bad = dict(state)
  bad["backbone.layers.0.ffn.layers.0.0.weight"] = np.ones((10, 64), np.float32)
  with pytest.raises(ConversionError,
                     match=r"'backbone.layers.0.ffn.layers.0.0.weight': shape \(64, 10\).*"
                           r"blocks_0/mlp/fc1/kernel needs \(64, 256\)"):
    convert.convert_checkpoint("reference", _write_safetensors(tmp_path, bad), c)
  deeper = tiny_model_config("mask_transformer", backbone_depth=3)
  with pytest.raises(ConversionError, match="missing key 'backbone.layers.2.ln1.weight'"):
    convert.convert_checkpoint("reference", _write_safetensors(tmp_path, state), deeper)


@pytest.mark.parametrize("variant, key", [("mask_transformer", "decode_head.cls_emb"),
                                          ("mlseg_oce", "backbone.cls_emb"),
                                          ("linear", "decode_head.head.weight")])
def test_class_count_mismatch_is_a_clear_error(tmp_path, variant, key):
  c = tiny_model_config(**VARIANTS[variant])
  _, state = reference_state_dict(c)
  path = _write_safetensors(tmp_path, state)
  c.num_classes = 7
  with pytest.raises(ConversionError, match=rf"checkpoint has 5 classes \({key}\), "
                                            r"config.model.num_classes=7"):
    convert.convert_checkpoint("reference", path, c)


def test_mmseg_class_count_comes_from_its_unused_conv_seg_too(tmp_path):
  c = tiny_model_config("mask_transformer")
  state = convert.from_params(random_params(c),
                              convert.checkpoint_layout("mmseg", c).rules)
  state["decode_head.conv_seg.weight"] = np.ones((5, 64, 1, 1), np.float32)
  state["decode_head.conv_seg.bias"] = np.ones(5, np.float32)
  path = _write_safetensors(tmp_path, state)
  params, not_filled = convert.convert_checkpoint("mmseg", path, c)  # conv_seg dropped.
  assert not_filled == [] and "conv_seg" not in str(convert.flatten(params))
  c.num_classes = 150
  with pytest.raises(ConversionError, match=r"checkpoint has 5 classes \(decode_head.cls_emb\)"):
    convert.convert_checkpoint("mmseg", path, c)


def test_formats_refuse_models_they_cannot_hold(tmp_path):
  with pytest.raises(ConversionError, match="no OCE backbone"):
    convert.checkpoint_layout("mmseg", tiny_model_config("mask_transformer", oce=True))
  with pytest.raises(ConversionError, match="mmsegmentation has no 'mlseg' head"):
    convert.checkpoint_layout("mmseg", tiny_model_config("mlseg"))
  with pytest.raises(ConversionError, match="unknown checkpoint format 'caffe'"):
    convert.checkpoint_layout("caffe", tiny_model_config())
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    convert.convert_checkpoint("reference", tmp_path / "nope.pth", tiny_model_config())


def test_pickled_objects_need_trust_pickle(tmp_path):
  c = tiny_model_config("linear")
  params, state = reference_state_dict(c)
  path = tmp_path / "with_objects.pth"
  torch.save({"meta": {"args": argparse.Namespace(lr=0.1)},
              "state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  with pytest.raises(ConversionError, match="--trust_pickle"):
    convert.convert_checkpoint("reference", path, c)
  converted, _ = convert.convert_checkpoint("reference", path, c, trust_pickle=True)
  _assert_trees_equal(converted, params)


def test_save_and_load_params_round_trip_with_their_note(tmp_path):
  c = tiny_model_config("mlseg", n_layers=3, topk=3)
  params = random_params(c)
  pretrained.save_params(tmp_path / "ckpt", params, source={"format": "reference"},
                         model_config=c)
  _assert_trees_equal(pretrained.load_params(tmp_path / "ckpt"), params)
  target = convert.abstract_params(c)
  loaded = pretrained.load_params(tmp_path / "ckpt", target)
  _assert_trees_equal(loaded, params)
  info = pretrained.load_info(tmp_path / "ckpt")
  assert info["source"] == {"format": "reference"}
  assert pretrained.model_config_from_info(info).to_dict() == c.to_dict()
  with pytest.raises(FileExistsError, match="not empty"):
    pretrained.save_params(tmp_path / "ckpt", params)
  pretrained.save_params(tmp_path / "ckpt", params, overwrite=True)
  other = tiny_model_config("mlseg", n_layers=3, topk=4)  # mask_norm over 4 rank slots.
  with pytest.raises(ConversionError,
                     match=r"decode_head/mask_norm/scale: checkpoint \(3,\), model \(4,\)"):
    pretrained.load_params(tmp_path / "ckpt", convert.abstract_params(other))


def test_init_from_fills_what_the_checkpoint_has_and_reports_the_rest(tmp_path):
  c = tiny_model_config("mask_transformer")
  fresh = random_params(c, seed=1)
  backbone = {"backbone": random_params(c, seed=2)["backbone"]}
  pretrained.save_params(tmp_path / "vit", backbone)
  params, kept = pretrained.init_from(fresh, tmp_path / "vit")
  _assert_trees_equal(params["backbone"], backbone["backbone"])
  _assert_trees_equal(params["decode_head"], fresh["decode_head"])
  assert sorted(kept) == sorted("/".join(p) for p in convert.flatten(fresh)
                                if p[0] == "decode_head")
  assert "decode_head/cls_emb" in kept


def test_init_from_names_tensors_the_model_cannot_take(tmp_path):
  c = tiny_model_config("mask_transformer")
  fresh = random_params(c)
  odd = {"backbone": dict(fresh["backbone"], extra_norm={"scale": np.ones(64, np.float32)})}
  pretrained.save_params(tmp_path / "extra", odd)
  with pytest.raises(ConversionError, match="backbone/extra_norm/scale is in the checkpoint, "
                                            "not in the model"):
    pretrained.init_from(fresh, tmp_path / "extra")
  wide = {"decode_head": dict(fresh["decode_head"], cls_emb=np.ones((1, 9, 64), np.float32))}
  pretrained.save_params(tmp_path / "wide", wide)
  with pytest.raises(ConversionError, match=r"decode_head/cls_emb: checkpoint \(1, 9, 64\), "
                                            r"model \(1, 5, 64\)"):
    pretrained.init_from(fresh, tmp_path / "wide")


def test_init_from_resizes_a_position_embedding_stored_for_another_crop(tmp_path):
  c = tiny_model_config("linear")  # 64x64: a 4x4 grid.
  fresh = random_params(c)
  pos = np.random.default_rng(3).normal(size=(1, 1 + 36, 64)).astype(np.float32)  # 6x6.
  pretrained.save_params(tmp_path / "p", {"backbone": {"pos_embedding": pos}})
  params, _ = pretrained.init_from(fresh, tmp_path / "p")
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, 6, 6, 64).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
  want = np.concatenate([pos[:, :1], grid.flatten(2).transpose(1, 2).numpy()], 1)
  np.testing.assert_allclose(params["backbone"]["pos_embedding"], want, atol=1e-5)


def test_init_from_keeps_target_dtype_and_sharding(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  fresh = {"w": jax.device_put(np.zeros((16, 3), np.float32), sharding),
           "b": np.zeros(3, np.float32)}
  pretrained.save_params(tmp_path / "s", {"w": np.arange(48, dtype=np.float64).reshape(16, 3)})
  params, kept = pretrained.init_from(fresh, tmp_path / "s")
  assert kept == ["b"]
  assert params["w"].sharding == sharding and params["w"].dtype == np.float32
  np.testing.assert_array_equal(params["w"], np.arange(48).reshape(16, 3))


CONFIG_FILE = """
import ml_collections

from mlseg_jax.models.segmenter import default_model_config


def get_config():
  config = ml_collections.ConfigDict()
  config.model = default_model_config()
  config.model.update(dict(num_classes=5, backbone_width=64, backbone_depth=2,
                           backbone_heads=4, img_size=(64, 64), d_model=64, n_heads=4,
                           d_ff=256, oce_start_layer=1))
  return config
"""


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mlseg_jax.convert", *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_converts_a_reference_checkpoint_and_exports_it_back(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(textwrap.dedent(CONFIG_FILE))
  c = tiny_model_config("mask_transformer", num_classes=7, oce=True)
  params, state = reference_state_dict(c)
  ref = _write_safetensors(tmp_path, state, "ref.safetensors")  # Spares the torch import.

  wrong = _cli("--format", "reference", "--input", ref, "--config", config,
               "--config.model.oce=True", "--output", tmp_path / "bad")
  assert wrong.returncode != 0
  assert ("checkpoint has 7 classes (backbone.cls_emb), config.model.num_classes=5"
          in wrong.stderr), wrong.stderr

  run = _cli("--format", "reference", "--input", ref, "--config", config,
             "--config.model.num_classes=7", "--config.model.oce=True",
             "--output", tmp_path / "orbax")
  assert run.returncode == 0, run.stderr
  _assert_trees_equal(pretrained.load_params(tmp_path / "orbax"), params)
  info = pretrained.load_info(tmp_path / "orbax")
  assert info["source"]["format"] == "reference" and info["model"]["num_classes"] == 7

  back = _cli("--to", "torch", "--input", tmp_path / "orbax", "--output", tmp_path / "back.pth")
  assert back.returncode == 0, back.stderr
  exported = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
  assert sorted(exported) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(exported[k].numpy(), v, err_msg=k)


def test_export_of_a_backbone_uses_the_reference_pretrained_names(tmp_path):
  c = tiny_model_config("mask_transformer")
  backbone = {"backbone": random_params(c)["backbone"]}
  pretrained.save_params(tmp_path / "vit", backbone, model_config=c)
  state = convert.export_torch(tmp_path / "vit", tmp_path / "vit.pth")
  assert "layers.0.attn.attn.in_proj_weight" in state and "ln1.weight" in state
  assert not any(k.startswith(("backbone.", "decode_head.")) for k in state)
  loaded = torch.load(tmp_path / "vit.pth", weights_only=True)["state_dict"]
  np.testing.assert_array_equal(loaded["pos_embed"].numpy(),
                                backbone["backbone"]["pos_embedding"])
  # The same bare names (mmseg's vit2mmseg pretrained files) read back as a backbone,
  # also for an OCE model, whose class tokens then keep their zeros init.
  oce = tiny_model_config("mlseg", n_layers=3, topk=3, oce=True)
  for fmt in ("mmseg", "reference"):
    params, not_filled = convert.convert_checkpoint(fmt, tmp_path / "vit.pth", oce)
    _assert_trees_equal(params, backbone)
    assert "backbone/cls_emb" in not_filled
    assert all(p.startswith("decode_head/") for p in not_filled if p != "backbone/cls_emb")


NO_TORCH = """
import sys
sys.modules["torch"] = None  # Any `import torch` now fails.
from conftest import tiny_model_config
from mlseg_jax import convert, pretrained
c = tiny_model_config("mask_transformer")
params, _ = convert.convert_checkpoint("reference", sys.argv[1], c)
pretrained.save_params(sys.argv[2], params, model_config=c)
assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
"""


def test_converting_safetensors_needs_no_torch(tmp_path):
  _, state = reference_state_dict(tiny_model_config("mask_transformer"))
  path = _write_safetensors(tmp_path, state)
  run = subprocess.run([sys.executable, "-c", NO_TORCH, str(path), str(tmp_path / "out")],
                       cwd=REPO / "tests", env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert (tmp_path / "out" / pretrained.PARAMS_DIR).is_dir()


def _one_line_error(run, *needles):
  """A user mistake: exit code 2 and one `error:` line on stderr naming what is wrong."""
  assert run.returncode == 2, run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_files_that_are_not_checkpoints_are_named_whatever_their_suffix(tmp_path):
  (tmp_path / "notes.npz").write_text("a text file\n")
  jpeg = next(QUICKSTART_DATA.glob("images/train/*.jpg"))
  (tmp_path / "photo.safetensors").write_bytes(jpeg.read_bytes())
  for name in ("notes.npz", "photo.safetensors"):
    run = _cli("--format", "timm", "--input", tmp_path / name, "--config",
               "configs/quickstart.py", "--output", tmp_path / "out")
    _one_line_error(run, f"{tmp_path / name} is not a checkpoint")
  _one_line_error(_cli("--format", "timm", "--input", tmp_path / "missing.pth", "--config",
                       "configs/quickstart.py", "--output", tmp_path / "out"),
                  "no checkpoint file", "missing.pth")


def test_the_format_is_read_from_the_file_not_its_name(tmp_path):
  state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "torch.npz")
  np.savez(tmp_path / "numpy.pth", **state)
  _write_safetensors(tmp_path, state, "st.bin")
  for name in ("torch.npz", "numpy.pth.npz", "st.bin"):
    read = convert.read_checkpoint(tmp_path / name)
    np.testing.assert_array_equal(np.asarray(read["a"]), state["a"], err_msg=name)


def test_a_pytorch_file_without_torch_says_how_to_install_it(tmp_path):
  torch.save({"a": torch.zeros(2)}, tmp_path / "w.pth")
  script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[:1] + "
            "sys.argv[2:]; runpy.run_module('mlseg_jax.convert', run_name='__main__')")
  for args in (["--format", "timm", "--input", tmp_path / "w.pth", "--config",
                "configs/quickstart.py", "--output", tmp_path / "out"],
               ["--to", "torch", "--input", tmp_path / "w", "--output", tmp_path / "w2.pth"]):
    run = subprocess.run([sys.executable, "-c", script, "-", *map(str, args)], cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=300)
    if "--to" in args:  # Fails on the missing directory first: also one line.
      assert run.returncode == 2 and run.stderr.startswith("error: "), run.stderr
      continue
    _one_line_error(run, "needs PyTorch, which is not installed: pip install torch")


def test_help_lists_the_converters_flags_and_exits_0():
  run = _cli("--help")
  assert run.returncode == 0, run.stderr
  for flag in ("--format:", "--input:", "--output:", "--[no]trust_pickle:", "--to:",
               "--[no]traceback:"):
    assert flag in run.stdout, flag


def _paper_model_configs():
  """One model config per distinct (backbone, head, OCE, pooling) among configs/*.py."""
  import importlib

  seen = {}
  for path in sorted((REPO / "configs").glob("segmenter_*.py")):
    c = importlib.import_module(f"mlseg_jax.configs.{path.stem}").get_config().model
    seen.setdefault((c.backbone, c.decoder, c.oce, c.pool_grid), (path.stem, c))
  return list(seen.values())


@pytest.mark.slow
def test_every_paper_model_has_a_complete_reference_layout():
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  configs = _paper_model_configs()
  assert len(configs) >= 6, [name for name, _ in configs]
  for name, c in configs:
    target = convert.abstract_params(c)
    # Zero-stride stand-ins: real shapes without real memory.
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), target)
    state = convert.from_params(zeros, convert.checkpoint_layout("reference", c).rules)
    assert state["backbone.pos_embed"].shape == (1, 1 + (c.img_size[0] // 16) ** 2,
                                                 1024 if c.backbone == "L/16" else 768), name


@pytest.mark.slow
def test_augreg_b16_at_real_shapes_becomes_the_512_backbone(tmp_path):
  c = tiny_model_config("mask_transformer", num_classes=150, backbone_width=None,
                        backbone_depth=None, backbone_heads=None, img_size=(512, 512),
                        d_model=768, n_heads=12, d_ff=3072)
  rng = np.random.default_rng(0)
  shapes = {"embedding/kernel": (16, 16, 3, 768), "embedding/bias": (768,), "cls": (1, 1, 768),
            "Transformer/posembed_input/pos_embedding": (1, 577, 768),
            "Transformer/encoder_norm/scale": (768,), "Transformer/encoder_norm/bias": (768,),
            "head/kernel": (768, 1000), "head/bias": (1000,)}
  for i in range(12):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{b}{ln}/scale"] = shapes[f"{b}{ln}/bias"] = (768,)
    for n in ("query", "key", "value"):
      shapes[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = (768, 12, 64)
      shapes[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = (12, 64)
    shapes[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = (12, 64, 768)
    shapes[f"{b}MultiHeadDotProductAttention_1/out/bias"] = (768,)
    shapes[f"{b}MlpBlock_3/Dense_0/kernel"], shapes[f"{b}MlpBlock_3/Dense_0/bias"] = (
        (768, 3072), (3072,))
    shapes[f"{b}MlpBlock_3/Dense_1/kernel"], shapes[f"{b}MlpBlock_3/Dense_1/bias"] = (
        (3072, 768), (768,))
  arrays = {k: np.broadcast_to(np.float32(rng.normal()), s) for k, s in shapes.items()}
  arrays["Transformer/posembed_input/pos_embedding"] = rng.normal(
      size=(1, 577, 768)).astype(np.float32)
  np.savez(tmp_path / "B_16.npz", **arrays)
  params, not_filled = convert.convert_checkpoint("augreg_npz", tmp_path / "B_16.npz", c)
  assert params["backbone"]["pos_embedding"].shape == (1, 1 + 32 * 32, 768)
  assert params["backbone"]["blocks_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  assert sorted(not_filled) == sorted("/".join(p) for p in convert.flatten(
      convert.abstract_params(c)) if p[0] == "decode_head")
  pe = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
  grid = pe[:, 1:].reshape(1, 24, 24, 768).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bicubic",
                                         align_corners=False)
  np.testing.assert_allclose(params["backbone"]["pos_embedding"][0, 1:],
                             grid.flatten(2).transpose(1, 2)[0].numpy(), atol=1e-5)


def test_a_training_step_exports_to_reference_names(tmp_path):
  import optax
  import orbax.checkpoint as ocp

  from mlseg_jax import checkpoints
  from mlseg_jax import train

  c = tiny_model_config("mlseg", n_layers=3, topk=3, oce=True)
  params, state = reference_state_dict(c, seed=4)
  train_state = train.TrainState(step=np.int32(7), params=params,
                                 opt_state=optax.sgd(0.1, momentum=0.9).init(params),
                                 rng=np.zeros(2, np.uint32))
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints",
                               options=ocp.CheckpointManagerOptions(create=True))
  checkpoints.save_checkpoint(mngr, train_state)
  mngr.wait_until_finished()
  exported = convert.export_torch(tmp_path / "checkpoints" / "7", tmp_path / "trained.pth",
                                  model_config=c)
  assert sorted(exported) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
