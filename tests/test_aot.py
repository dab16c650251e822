"""Compiling for TPU slices on the CPU (libtpu's compile-only devices): slice names, the
programs of a config, the memory and collectives XLA reports, the refusals."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY
from mlseg_jax import aot
from mlseg_jax import errors
from mlseg_jax.configs import quickstart
from mlseg_jax.evaluation import batching
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import runner
from mlseg_jax.models.segmenter import abstract_params

pytest.importorskip("libtpu")


@pytest.mark.parametrize("name,topology,chips,hosts", [
    ("v5e-8", "v5e:2x4", 8, 1), ("v5litepod-4", "v5e:2x2", 4, 1), ("v6e-8", "v6e:2x4", 8, 1),
    ("v4-8", "v4:2x2x1", 4, 1), ("v5p-8", "v5p:2x2x1", 4, 1), ("v4-32", "v4:2x2x4", 16, 4),
    ("v5e-32", "v5e:4x8", 32, 8), ("v5p-128", "v5p:4x4x4", 64, 16),
    ("v5e:2x2", "v5e:2x2", 4, 1), ("V6E:4x4", "v6e:4x4", 16, 4)])
def test_slice_names_as_cloud_tpu_counts_them(name, topology, chips, hosts):
  s = aot.parse_slice(name)
  assert (s.topology, s.chips, s.hosts) == (topology, chips, hosts)


@pytest.mark.parametrize("name", ["v5e", "v7x-8", "v4-7", "v4-6", "v5e-12", "v5e:2x2x1",
                                  "v4:2x4", "tpu-8", ""])
def test_unknown_slices_are_refused(name):
  with pytest.raises(errors.UsageError, match="topology"):
    aot.parse_slice(name)


def test_one_device_per_chip_and_hosts_of_a_multi_host_slice():
  v4 = aot.slice_devices(aot.parse_slice("v4-8"))
  assert len(v4) == 4 and v4[0].device_kind == "TPU v4"  # megacore: a chip is a device
  pod = aot.slice_devices(aot.parse_slice("v5e-32"))
  assert len(pod) == 32 and len({d.process_index for d in pod}) == 8


_HLO = """
  %all-reduce.1 = (f32[192]{0:T(256)}, /*index=1*/f32[8,4]{1,0}) all-reduce(%a, %b), to_apply=%add
  %all-gather-start = (bf16[16,4]{1,0}, bf16[64,4]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done = bf16[64,4]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.2 = f32[4]{0} reduce-scatter(%d), dimensions={0}
  %fusion.3 = f32[4]{0} fusion(%e), kind=kLoop, calls=%all-reduce-like
"""


def test_collectives_are_counted_with_their_result_bytes():
  assert aot.collectives(_HLO) == {
      "all-reduce": {"count": 1, "bytes": 192 * 4 + 32 * 4},
      "all-gather": {"count": 1, "bytes": 64 * 4 * 2},
      "reduce-scatter": {"count": 1, "bytes": 16}}


def test_a_tpu_program_stays_out_of_the_persistent_cache_the_process_has():
  # conftest's cache is on for the tests, as a user's may be: a TPU executable written to
  # it cannot be read back on this host, and every later compile would warn so.
  cache = Path(jax.config.jax_compilation_cache_dir)
  s = aot.parse_slice("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(aot.slice_devices(s)), ("d",))
  tpu_x = jax.ShapeDtypeStruct(
      (64, 96), jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  cpu_x = jax.ShapeDtypeStruct((64, 96), jnp.float32)
  salt = float(np.random.default_rng().integers(1, 2 ** 20))  # programs no run cached yet

  def program(scale):
    def cache_probe(x):  # its name, in its cache entries', tells them from other tests'
      return jnp.tanh(x @ x.T * scale).sum(0)
    return jax.jit(cache_probe)

  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    before = set(cache.glob("jit_cache_probe-*"))
    program(salt).lower(cpu_x).compile()  # the process's cache in use, as a user's would be
    assert aot.compile_program("tiny", program(salt + 1), [tpu_x], s.chip).fits
    program(salt + 2).lower(cpu_x).compile()  # and still in use after
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  assert len(set(cache.glob("jit_cache_probe-*")) - before) == 2
  assert jax.config.jax_enable_compilation_cache


def test_a_program_that_does_not_fit_says_by_how_much():
  s = aot.parse_slice("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(aot.slice_devices(s)), ("d",))
  f = jax.jit(lambda x, w: jnp.sort(jnp.einsum("bi,j->bij", x, w), axis=1))

  def args(n):
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))  # noqa: E731
    return [jax.ShapeDtypeStruct((64, n), jnp.float32, sharding=spec("d")),
            jax.ShapeDtypeStruct((n,), jnp.bfloat16, sharding=spec())]

  fits = aot.compile_program("small", f, args(256), s.chip)
  assert fits.fits and fits.arguments == aot.argument_bytes(args(256)) == 16 * 256 * 4 + 512
  # The compiler stops at the temporaries (16 x 16384^2 floats per chip, and the sort's):
  # they and the arguments are what the program needs at least.
  big = aot.compile_program("big", f, args(16384), s.chip)
  assert not big.fits and big.temporaries >= 16 * 16384 ** 2 * 4
  assert big.total == big.temporaries + aot.argument_bytes(args(16384))
  over = (big.total - 16 * 2 ** 30) / 2 ** 30
  assert over > 0 and f"over by {over:.2f} GiB" in aot.format_table(s, [fits, big])

  class Near:  # close to the HBM the compiler reports the whole program's use instead
    def lower(self, *args):
      return self

    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile "
                         "permanent error. Ran out of memory in memory space hbm. Used "
                         "15.80G of 15.75G hbm. Exceeded hbm capacity by 51.97M.")

  near = aot.compile_program("near", Near(), [], s.chip)
  assert not near.fits and near.total == int(15.80 * 2 ** 30)


def _tiny_quickstart():
  config = quickstart.get_config()
  config.unlock()
  config.data.test_scale = (120, 90)
  config.eval.stride = (96, 96)
  config.lock()
  return config


@pytest.fixture(scope="module")
def quickstart_on_v5e_2x2():
  sizes = [(90, 120), (120, 90), (60, 80), (90, 120), (90, 120)]
  return aot.run(_tiny_quickstart(), "v5e:2x2", sizes=sizes), sizes


def test_quickstart_step_compiles_for_a_tpu_with_memory_and_data_parallel_all_reduce(
    quickstart_on_v5e_2x2):
  report, _ = quickstart_on_v5e_2x2
  assert report["device_kind"] == "TPU v5 lite" and report["chips"] == 4
  step = report["programs"][0]
  assert step["name"].startswith("train step, batch 8 (2 per chip)")
  assert step["fits"] and step["flops"] > 1e9
  assert step["arguments"] > 0 and step["temporaries"] > 0
  assert step["total"] >= step["arguments"] + step["temporaries"]
  # Gradients summed over the 4 data-parallel chips: at least the parameters' bytes.
  params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(
      abstract_params(_tiny_quickstart().model)))
  assert step["collectives"]["all-reduce"]["bytes"] >= 4 * params
  assert 0 < step["mfu_bound"] <= 1 and step["roofline_s"] > 0
  assert "| train step, batch 8 (2 per chip) |" in report["table"]


def test_every_evaluation_forward_is_compiled_once(quickstart_on_v5e_2x2):
  report, sizes = quickstart_on_v5e_2x2
  forwards = [p for p in report["programs"] if p["name"].startswith("eval forward")]
  config = _tiny_quickstart()
  expected = runner.forward_calls(
      aot.eval_settings(config, "ss"), sizes, local_shards=4,
      batching=batching.Batching.from_config(config.eval))
  assert len(forwards) == len(expected) == report["eval"]["programs"] > 1
  assert sum(p["calls"] for p in forwards) == sum(expected.values())
  assert all(p["fits"] and p["flops"] > 0 and p["arguments"] > 0 for p in forwards)


def test_forward_calls_are_the_calls_segment_makes():
  settings = geometry.EvalSettings(mean=(0, 0, 0), std=(1, 1, 1), test_scale=(64, 48),
                             crop=(32, 32), stride=(24, 24), ratios=(0.5, 1.0), flip=True,
                             patch_size=8)
  sizes = [(48, 64), (64, 48), (30, 40), (48, 64), (48, 64), (20, 100), (48, 64)]
  seen = collections.Counter()

  def logits_fn(windows):
    seen[windows.shape[:3]] += 1
    n, h, w, _ = windows.shape
    return jnp.zeros((n, -(-h // 8), -(-w // 8), 3))

  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
              "label": np.zeros((h, w), np.int32)} for h, w in sizes]
  options = dict(batching=batching.Batching(images_per_batch=2, windows_per_call=4))
  list(runner.segment(logits_fn, records, settings, num_classes=3, **options))
  expected = runner.forward_calls(settings, sizes, **options)
  assert seen == collections.Counter({(n, h, w): c for (h, w, n), c in expected.items()})


def _fake_steps(monkeypatch, chip, gib_per_chip):
  compiled = []

  def fake_step(config, devices, batch, chip):
    per_chip = batch // 8
    compiled.append(per_chip)
    gib = gib_per_chip(per_chip)
    total = int((gib or chip.hbm_gib + 1) * 2 ** 30)
    return aot.Program(f"train step, batch {batch} ({per_chip} per chip)", 0.0,
                       fits=gib is not None, total=total)

  monkeypatch.setattr(aot, "train_step_program", fake_step)
  return compiled


def test_max_batch_is_the_largest_that_fits(monkeypatch):
  devices = aot.slice_devices(aot.parse_slice("v5e-8"))
  chip, config = aot.CHIPS["v5e"], quickstart.get_config()
  linear = lambda n: 1.5 + 0.9 * n if 1.5 + 0.9 * n <= 16 else None  # noqa: E731
  compiled = _fake_steps(monkeypatch, chip, linear)
  best, tried = aot.max_batch_per_chip(config, devices, chip)
  assert best == 16 and compiled == [1, 2, 16, 17] and len(tried) == 4

  compiled.clear()  # a start at the answer: two compiles
  assert aot.max_batch_per_chip(config, devices, chip, hint=16)[0] == 16
  assert compiled == [16, 17]
  compiled.clear()  # too high a start gallops down
  assert aot.max_batch_per_chip(config, devices, chip, hint=40)[0] == 16
  assert compiled[:3] == [40, 39, 37] and 16 in compiled and 17 in compiled
  compiled.clear()
  assert aot.max_batch_per_chip(config, devices, chip, hint=40, limit=12)[0] == 12
  assert compiled == [12]

  # Near the HBM the compiler rematerialises: memory stops growing, more still fits.
  plateau = lambda n: min(1.5 + 0.9 * n, 15.5) if n <= 45 else None  # noqa: E731
  compiled = _fake_steps(monkeypatch, chip, plateau)
  assert aot.max_batch_per_chip(config, devices, chip)[0] == 45
  assert len(compiled) <= 12 and {45, 46} <= set(compiled)
  nothing = _fake_steps(monkeypatch, chip, lambda n: None)
  assert aot.max_batch_per_chip(config, devices, chip)[0] == 0 and nothing == [1]
  assert aot.max_batch_per_chip(config, devices, chip, hint=5)[0] == 0


def _aot(*args, block_libtpu=False, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  code = ("import sys, runpy; " + ("sys.modules['libtpu'] = None; " if block_libtpu else "")
          + "sys.argv = ['aot'] + sys.argv[1:]; runpy.run_module('mlseg_jax.aot', "
          "run_name='__main__')")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--topology", "v5e-7"], "--topology=v5e-7: a v5e slice counts chips, a power of two"),
    (["--topology", "h100-8"], "--topology='h100-8' is not a TPU slice"),
    (["--topology", "v5e-8", "--config.mesh.fsdp=3"],
     "mesh.data=-1 x mesh.fsdp=3 does not fit 8 devices"),
    (["--topology", "v5e-32"], "train.batch_size=8 is not divisible by the data-parallel "
     "size 32"),
    (["--topology", "v5e-8", "--batch", "12"], "train.batch_size=12 is not divisible"),
    (["--topology", "v5e-8", "--config.model.attention_impl=cudnn",
      "--config.model.dtype=bfloat16"], "model.attention_impl='cudnn' is for NVIDIA GPUs"),
    (["--topology", "v5e-8", "--max_batch_hint=4"], "--max_batch_hint needs --max_batch"),
])
def test_mistakes_get_one_line_and_exit_2(args, message):
  proc = _aot("--config", "quickstart", "--noeval", *args)
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert message in proc.stderr[proc.stderr.index("error:"):]
  assert "Traceback" not in proc.stderr


def test_no_libtpu_is_one_line():
  proc = _aot("--config", "quickstart", "--topology", "v5e-8", block_libtpu=True)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: compiling for a TPU needs libtpu: pip install" in proc.stderr


def test_the_command_prints_its_table_and_keeps_nothing_in_a_persistent_cache(tmp_path):
  # A cache the user's environment enables: TPU executables in it could not be read back.
  cache = tmp_path / "cache"
  proc = _aot("--config", "quickstart", *TINY, "--topology", "v5e-4", "--noeval",
              JAX_COMPILATION_CACHE_DIR=str(cache))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| train step, batch 8 (2 per chip) |" in proc.stdout
  assert "compilation cache" not in proc.stderr, proc.stderr[-2000:]
  assert not cache.exists() or not any(cache.iterdir())


def test_the_command_and_main_import_into_one_process():
  # Both define --config when run; importing them for their functions must not.
  import mlseg_jax.aot  # noqa: F401
  import mlseg_jax.main  # noqa: F401


def test_the_paper_table_renders_what_is_compiled_and_marks_the_rest_pending(
    quickstart_on_v5e_2x2, tmp_path, monkeypatch):
  from benchmarks import tpu_table

  report, _ = quickstart_on_v5e_2x2
  rows = tpu_table.rows()
  assert rows[0] == "segmenter_mlseg_vit_b16_512_160k_ade20k" and len(rows) == len(set(rows))
  monkeypatch.setattr(tpu_table, "OUT", tmp_path)
  (tmp_path / "v5e:2x2").mkdir()
  (tmp_path / "v5e:2x2" / f"{rows[1]}.json").write_text(json.dumps(report, default=str))
  lines = tpu_table.render(["v5e:2x2"]).splitlines()
  assert len(lines) == 2 + len(rows)
  done = next(line for line in lines if line.startswith(f"| {rows[1]} |"))
  step = report["programs"][0]
  assert f"yes ({step['total'] / 2 ** 30:.2f} of 16 GiB)" in done
  assert f"| {step['flops'] / 1e9:.0f} |" in done and "pending" in done  # max batch
  assert sum(line.split(" | ")[2:3] == ["pending"] for line in lines) == len(rows) - 1


def test_the_paper_table_takes_the_step_and_max_batch_from_the_search(
    quickstart_on_v5e_2x2, tmp_path, monkeypatch):
  from benchmarks import tpu_table

  report, _ = quickstart_on_v5e_2x2
  row = tpu_table.rows()[0]
  monkeypatch.setattr(tpu_table, "OUT", tmp_path)
  (tmp_path / "v5e:2x2").mkdir()
  (tmp_path / "v5e:2x2" / f"{row}.json").write_text(json.dumps(report, default=str))
  searched = json.loads(json.dumps(report, default=str))
  searched["programs"][0]["flops"] = 7.4e12  # the later compile's numbers win
  searched["max_batch_per_chip"] = 13
  (tmp_path / "v5e:2x2" / f"{row}.max_batch.json").write_text(json.dumps(searched))
  done = next(line for line in tpu_table.render(["v5e:2x2"]).splitlines()
              if line.startswith(f"| {row} |"))
  assert "| 13 | 7400 |" in done and "pending" not in done


def test_a_new_row_compiles_its_step_once_for_the_table_and_the_max_batch(tmp_path,
                                                                          monkeypatch):
  from benchmarks import tpu_table

  calls = []

  def fake_aot(row, topology, out, *extra):
    calls.append((row, topology) + extra)
    programs = [dict(name="train step, batch 8 (2 per chip)", fits=True, total=2 ** 33,
                     flops=1e12, temporaries=2 ** 32, mfu_bound=0.2, compile_s=100.0)]
    searched = [dict(programs[0], name="train step, batch 40 (5 per chip)", flops=5e12)]
    report = dict(programs=searched if "--notrain" in extra else programs, remat=False,
                  chip=dict(aot.CHIPS[topology.split("-")[0]].__dict__),
                  max_batch_per_chip=5 if "--max_batch" in extra else None)
    if "--notrain" not in extra:
      report["train_batch"] = 8
    out.write_text(json.dumps(report))
    return report

  monkeypatch.setattr(tpu_table, "OUT", tmp_path)
  monkeypatch.setattr(tpu_table, "_aot", fake_aot)
  a, b = "segmenter_vit_b16_512_160k_ade20k", "segmenter_vit_b16_512_40k_coco_stuff10k"
  tpu_table.compile_row(a, "v4-8", max_batch=True)
  hint = tpu_table.max_batch_hint
  monkeypatch.setattr(tpu_table, "max_batch_hint", None)  # resumed: nothing searched again
  tpu_table.compile_row(a, "v4-8", max_batch=True)
  monkeypatch.setattr(tpu_table, "max_batch_hint", hint)
  assert calls == [(a, "v4-8", "--max_batch")]
  assert json.loads((tmp_path / "v4-8" / f"{a}.max_batch.json").read_text())[
      "max_batch_per_chip"] == 5
  assert (tmp_path / "v4-8" / f"{a}.json").exists()
  assert not list((tmp_path / "v4-8").glob("*.tmp"))

  # A row compiled before the search: the search alone, from its most similar row's answer
  # (here the same row on a slice of half the HBM).
  calls.clear()
  (tmp_path / "v5e-8").mkdir()
  (tmp_path / "v5e-8" / f"{a}.json").write_text(
      (tmp_path / "v4-8" / f"{a}.json").read_text())
  tpu_table.compile_row(a, "v5e-8", max_batch=True)
  assert calls == [(a, "v5e-8", "--noeval", "--notrain", "--max_batch",
                    "--max_batch_hint=2", "--config.model.remat=False")]
  assert tpu_table.max_batch_hint(b, "v4-8") == 5  # this slice's breaks the tie
  assert tpu_table.max_batch_hint(a, "v6e-8") == 5
  # The table's step is the row's own where the search compiled none.
  line = next(l for l in tpu_table.render(["v5e-8"]).splitlines() if l.startswith(f"| {a} |"))
  assert "| 5 | 1000 |" in line and "pending" not in line


def test_a_search_starts_from_what_the_rows_searched_predict(tmp_path, monkeypatch):
  from benchmarks import tpu_table

  monkeypatch.setattr(tpu_table, "OUT", tmp_path)
  (tmp_path / "v5e-8").mkdir()

  def searched(row, best, topology="v5e-8"):
    (tmp_path / topology / f"{row}.max_batch.json").write_text(json.dumps(
        dict(max_batch_per_chip=best, chip=dict(aot.CHIPS[topology.split("-")[0]].__dict__))))

  searched("segmenter_vit_b16_512_160k_ade20k", 45)
  searched("segmenter_mlseg_vit_b16_512_160k_ade20k", 26)
  searched("segmenter_mlseg_gt_vit_b16_512_160k_ade20k", 45)
  searched("segmenter_mlseg_gt_vit_b16_512_160k_ade20k_full", 13)
  searched("segmenter_mlseg_gt_vit_b16_512_320k_coco_lvis", 9)
  hint = lambda row, topology="v5e-8": tpu_table.max_batch_hint(row, topology)  # noqa: E731
  # A part two searched rows differ in alone scales the answer by their ratio.
  assert hint("segmenter_vit_b16_512_160k_ade20k_full") == 13
  assert hint("segmenter_mlseg_vit_b16_512_160k_ade20k_full") == round(26 * 13 / 45)
  # Else the nearest: a method by its words, a dataset by its classes, a crop by pixels.
  assert hint("segmenter_mlseg_oce_vit_b16_512_160k_ade20k") == 26
  assert hint("segmenter_mlseg_oce_vit_b16_512_160k_ade20k_full") == round(26 * 13 / 45)
  assert hint("segmenter_mlseg_gt_vit_b16_512_40k_coco_stuff10k") == 45  # 171 classes, not 1284
  assert hint("segmenter_vit_b16_640_320k_coco_lvis") == round(9 * (512 / 640) ** 2)
  # Another slice's by HBM; the schedule's length changes nothing.
  assert hint("segmenter_vit_b16_512_160k_ade20k", "v4-8") == 90
  searched("segmenter_vit_b16_512_40k_coco_stuff10k", 44)
  assert hint("segmenter_vit_b16_512_80k_coco_stuff10k") == 44
  assert hint("segmenter_vit_b16_512_160k_ade20k") == 44  # not its own answer: a new search
  # A ratio carried from other models is taken from the nearest: MLSeg on COCO-Stuff from
  # MLSeg on ADE20K (150 classes, not COCO+LVIS's 1,284) by the mean ADE20K -> COCO-Stuff
  # ratio of the models searched on both.
  searched("segmenter_mlseg_gt_vit_b16_512_40k_coco_stuff10k", 42)
  searched("segmenter_mlseg_vit_b16_512_320k_coco_lvis", 28)
  assert hint("segmenter_mlseg_vit_b16_512_40k_coco_stuff10k") == round(
      26 * (42 / 45 + 44 / 45) / 2)
  # Another slice's answer scaled by how the two slices' answers compare, on the models
  # searched on both that are most like it (ViT-L/16 640 gains more from 32 GiB than
  # ViT-B/16 512 does), where there are any.
  (tmp_path / "v4-8").mkdir()
  searched("segmenter_mlseg_vit_b16_512_160k_ade20k", 53, "v4-8")
  searched("segmenter_mlseg_vit_l16_640_160k_ade20k", 30, "v4-8")
  searched("segmenter_mlseg_vit_l16_640_160k_ade20k", 9)
  searched("segmenter_mlseg_vit_l16_640_40k_coco_stuff10k", 9)
  assert hint("segmenter_mlseg_vit_l16_640_40k_coco_stuff10k", "v4-8") == 30
  assert hint("segmenter_vit_b16_512_40k_coco_stuff10k", "v4-8") == round(44 * 53 / 26)
