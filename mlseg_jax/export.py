r"""The model's fixed-window forward as a file that runs without this code: StableHLO
(`jax.export`) or ONNX (`jax2onnx`).

    python -m mlseg_jax.export --workdir DIR --format stablehlo --output model.stablehlo
    python -m mlseg_jax.export --config configs/NAME.py --config.init_from=WEIGHTS \
        --format onnx --window 512 --output model.onnx

The exported function is the forward evaluation calls on each batch of windows
(`evaluation.evaluators.make_predict_fn`), with the weights inside the file as constants:

  windows       (N, window_h, window_w, 3) float32, RGB normalised as (pixel - mean) / std
  -> logits     (N, window_h / patch, window_w / patch, n_cls) float32 on the patch grid;
                MLSeg's top-k heads: -100 outside each window's k selected classes
     image_logits  (N, n_cls) float32, top-k heads only: the multi-label scores

PATH.json beside it says what a deployment needs: the window, the normalisation, the class
names, the patch size, the decoder, the output names and shapes, and the test scale and
stride of the sliding window that wraps the window model (docs/export.md).

N is symbolic ("batch") in StableHLO. ONNX: symbolic for Segmenter's heads; jax2onnx 0.12
cannot trace MLSeg's gating at a symbolic batch (`jnp.full` of the batch's shape), so the
top-k heads get a fixed N (`--batch`, 1 unless given). `--batch N` fixes it for any model.

Weights come from the workdir's latest checkpoint, else `config.init_from`, exactly as for
`--mode eval`; the config is the workdir's config.json unless `--config` is given (then it
must agree with the run where the parameters depend on it). The +GT oracle
(model.decoder='mlseg_gt') takes each image's classes from its labels and is refused.

ONNX needs `pip install "jax2onnx>=0.12.5,<0.13" onnxruntime` (requirements-test.txt);
jax2onnx 0.12 gives ONNX TopK's int64 indices to the int32 nodes after it, which
`_int32_topk_indices` repairs with a Cast; besides, the converter's unread constants and its
notes on intermediate shapes are dropped. Nothing else of what it writes is changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as pylogging
import os
from typing import Any, Callable, Sequence

from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from mlseg_jax import errors
from mlseg_jax.paths import absolute_path, writable_directory

FORMATS = ("stablehlo", "onnx")
INPUT_NAME = "windows"
OUTPUT_NAMES = ("logits", "image_logits")  # The order of ONNX's outputs (the ones it has).
ONNX_INSTALL = 'pip install "jax2onnx>=0.12.5,<0.13" onnxruntime'
ONNX_OPSET = 20  # The first with Gelu, which jax2onnx writes: ONNX Runtime 1.17 and later.
SYMBOLIC_BATCH = "batch"


# ---------------------------------------------------------------------------------------
# The config and the weights, as --mode eval finds them.


def export_config(config, workdir):
  """The config to export: `config`, or (None) the workdir's config.json, validated, checked
  against the workdir's and copied onto one device's mesh (the export runs on one device
  whatever mesh training used), with the attention resolved to XLA's unless the config
  names a kernel (portable: no cuDNN call in the file)."""
  if workdir and not epath.Path(workdir).exists():
    raise errors.UsageError(f"--workdir {workdir} does not exist")
  from mlseg_jax.configs import validate
  from mlseg_jax.models.decoders import decoder_spec

  saved = validate.workdir_config(workdir) if workdir else None
  given = config is not None
  if not given:
    if saved is None:
      raise errors.UsageError("export needs --config (with --config.init_from=WEIGHTS) or a "
                              f"--workdir holding {validate.CONFIG_FILE}")
    config = saved
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp = 1, 1
  validate.validate_config(config, num_devices=1)
  if given and saved is not None:
    validate.check_against_workdir(config, saved, f"{workdir}/{validate.CONFIG_FILE}")
  if decoder_spec(config.model).needs_labels:
    raise errors.ConfigError(
        "the +GT oracle (model.decoder='mlseg_gt') takes each image's class set from its "
        "labels, which an exported model does not have; export the model it is an oracle "
        "for (model.decoder='mlseg')")
  if config.model.attention_impl is None:
    config.model.attention_impl = "xla"
  return config


def load_params(config, workdir):
  """(params as host arrays, where they came from): the workdir's latest checkpoint, else
  config.init_from, as --mode eval finds them."""
  import jax

  from mlseg_jax import sharding as sharding_lib
  from mlseg_jax.evaluation.modes import load_params_for_eval

  mesh = sharding_lib.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  params, source = load_params_for_eval(config, workdir, mesh)
  return jax.device_get(params), source


def window_forward(model_config, params) -> Callable[[Any], dict]:
  """windows (N, h, w, 3) -> {"logits", ["image_logits"]}: the evaluation's forward with
  `params` as constants."""
  from mlseg_jax.evaluation import evaluators

  predict = evaluators.make_predict_fn(model_config)
  return lambda windows: predict(params, windows)


def parse_window(text: str | None, default: Sequence[int], patch: int) -> tuple[int, int]:
  """--window: "512" (square) or "512,683" (h,w); None: `default` (data.crop_size)."""
  if text is None:
    window = tuple(int(s) for s in default)
  else:
    try:
      window = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
      window = ()
    window = window * 2 if len(window) == 1 else window
    if len(window) != 2 or min(window) < 1:
      raise errors.UsageError(f"--window={text!r}: a size (512) or height,width (512,683)")
  if any(s % patch for s in window):
    raise errors.UsageError(f"--window={window[0]},{window[1]} is not a multiple of the "
                            f"patch size {patch}")
  return window


# ---------------------------------------------------------------------------------------
# The formats.


def export_stablehlo(forward, window: Sequence[int], batch: int | None,
                     platforms: Sequence[str] | None = None):
  """The `jax.export.Exported` of `forward` on (batch or symbolic, *window, 3) float32."""
  import jax
  import jax.numpy as jnp

  n = jax.export.symbolic_shape(SYMBOLIC_BATCH)[0] if batch is None else batch
  spec = jax.ShapeDtypeStruct((n, *window, 3), jnp.float32)
  return jax.export.export(jax.jit(forward), platforms=platforms)(spec)


def import_onnx_converter():
  """(jax2onnx, onnx), or a one-line error naming the packages to install."""
  try:
    import jax2onnx
    import onnx
  except ImportError as e:
    raise errors.UserError(f"--format onnx needs jax2onnx and onnx ({e.name} is not "
                           f"installed): {ONNX_INSTALL}") from None
  return jax2onnx, onnx


@contextlib.contextmanager
def _contained_converter():
  """jax2onnx warns about plugins for libraries we do not use, prints debug lines, and its
  plugins replace functions of jax's own namespaces for good when they load (jax2onnx 0.12
  swaps `jnp.cumsum` for a wrapper that refuses a positional axis): the caller's process gets
  its log levels, its stdout and jax's functions back afterwards."""
  import jax

  namespaces = [jax, jax.numpy, jax.lax, jax.nn, jax.image, jax.random]
  saved = [dict(vars(ns)) for ns in namespaces]
  loggers = [pylogging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(pylogging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
    for ns, before in zip(namespaces, saved):
      for name, value in before.items():
        if vars(ns).get(name) is not value:
          setattr(ns, name, value)


def export_onnx(forward, window: Sequence[int], batch: int | None, names: Sequence[str],
                opset: int = ONNX_OPSET):
  """The ONNX ModelProto of `forward` on (batch or symbolic, *window, 3) float32, with its
  outputs `names` in that order."""
  jax2onnx, _ = import_onnx_converter()

  def outputs(windows):
    out = forward(windows)
    return tuple(out[name] for name in names)

  n = SYMBOLIC_BATCH if batch is None else batch
  with _contained_converter():
    model = jax2onnx.to_onnx(outputs, [(n, *window, 3)], model_name="mlseg_jax_window",
                             opset=opset, input_names=[INPUT_NAME], output_names=list(names))
  _int32_topk_indices(model.graph)
  _drop_unused_initializers(model.graph)
  # The converter's notes on intermediate shapes are optional and not always right (int64
  # after TopK, batch 1 where it is fixed at N); the graph's inputs and outputs keep theirs.
  del model.graph.value_info[:]
  return model


def _subgraphs(graph):
  yield graph
  for node in graph.node:
    for attr in node.attribute:
      for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
        yield from _subgraphs(g)


def _int32_topk_indices(graph) -> None:
  """lax.top_k's indices are int32; jax2onnx 0.12 passes ONNX TopK's int64 ones on to the
  nodes it wrote for int32, which ONNX Runtime refuses to load. A Cast after each TopK
  (unless the converter casts them itself, as later versions do) restores the jaxpr's type.
  The graph's value_info, which records the int64 downstream too, must go as well."""
  from onnx import TensorProto, helper

  readers: dict[str, list] = {}
  for node in graph.node:
    for name in node.input:
      readers.setdefault(name, []).append(node)
  nodes = []
  for node in graph.node:
    nodes.append(node)
    if node.op_type != "TopK" or len(node.output) < 2:
      continue
    indices = node.output[1]
    if readers.get(indices) and all(r.op_type == "Cast" for r in readers[indices]):
      continue
    node.output[1] = f"{indices}_int64"
    nodes.append(helper.make_node("Cast", [node.output[1]], [indices], to=TensorProto.INT32,
                                  name=f"{node.name}_indices_int32"))
  if len(nodes) != len(graph.node):
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_initializers(graph) -> None:
  """Constants the converter left unread (ONNX Runtime warns about each one)."""
  used = {name for g in _subgraphs(graph) for node in g.node for name in node.input}
  used |= {o.name for o in graph.output}
  keep = [t for t in graph.initializer if t.name in used]
  if len(keep) != len(graph.initializer):
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _write_onnx(model, output: str) -> None:
  import onnx

  # Protobuf stops at 2 GB: bigger models keep their weights in OUTPUT.data beside it.
  if model.ByteSize() < 2**31 - 2**26:
    epath.Path(output).write_bytes(model.SerializeToString())
  else:
    onnx.save_model(model, output, save_as_external_data=True,
                    location=os.path.basename(output) + ".data")


# ---------------------------------------------------------------------------------------
# Exporting.


def sidecar(config, *, fmt: str, window: Sequence[int], batch: int | None,
            outputs: dict, source: str, **extra) -> dict:
  """What PATH.json holds: the exported function's contract and what wraps it."""
  from mlseg_jax import data as data_lib
  from mlseg_jax.models.decoders import decoder_spec
  from mlseg_jax.models.mlseg import UNSELECTED_LOGIT
  from mlseg_jax.models.vit import VARIANTS

  info = data_lib.dataset_info(config.data)
  m = config.model
  n = SYMBOLIC_BATCH if batch is None else batch
  topk = m.topk if decoder_spec(m).selects_topk else None
  return {
      "format": fmt,
      "input": {"name": INPUT_NAME, "shape": [n, *window, 3], "dtype": "float32",
                "layout": "NHWC, RGB"},
      "normalisation": {"mean": list(info.mean), "std": list(info.std),
                        "applies": "(pixel - mean) / std per RGB channel, pixels 0..255"},
      "output_names": list(outputs),
      "outputs": {name: {"shape": [n, *shape[1:]], "dtype": dtype}
                  for name, (shape, dtype) in outputs.items()},
      "window": list(window),
      "patch_size": VARIANTS[m.backbone][3],
      "decoder": m.decoder,
      "num_classes": m.num_classes,
      "class_names": list(info.class_names),
      "topk": topk,
      "unselected_logit": UNSELECTED_LOGIT if topk else None,
      "sliding_window": {"test_scale": list(config.data.test_scale),
                         "stride": list(config.eval.stride), "window": list(window)},
      "weights": source,
      **extra,
  }


def export(config, workdir, fmt: str, output, *, window: str | Sequence[int] | None = None,
           batch: int | None = None, platforms: Sequence[str] | None = None,
           opset: int = ONNX_OPSET, overwrite: bool = False) -> dict:
  """Writes the window model to `output` and its sidecar to `output`.json; returns the
  sidecar's content.

  config: None for the workdir's config.json; workdir: None with config.init_from.
  window: "512", "512,683", (h, w) or None (data.crop_size). batch: None for symbolic
  (where the format allows it). platforms: StableHLO's (default: this machine's backend).
  """
  import jax

  from mlseg_jax.models.decoders import decoder_spec
  from mlseg_jax.models.vit import VARIANTS

  if fmt not in FORMATS:
    raise errors.UsageError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
  if batch is not None and batch < 1:
    raise errors.UsageError(f"--batch={batch} must be positive (or unset: symbolic)")
  output = os.fspath(output)
  meta = output + ".json"
  for path in (output, meta):
    if epath.Path(path).exists() and not overwrite:
      raise errors.UsageError(f"{path} exists; pass --overwrite to replace it")
  # Its folder is created, as predict's is; a read-only or full one is one line, now.
  writable_directory(absolute_path(output).parent, "the folder of --output")
  if fmt == "onnx":
    import_onnx_converter()  # Before anything slow.
  config = export_config(config, workdir)
  if fmt == "onnx" and config.model.attention_impl != "xla":
    raise errors.ConfigError(f"model.attention_impl={config.model.attention_impl!r} is a "
                             "GPU kernel ONNX has no operator for: export with 'xla'")
  patch = VARIANTS[config.model.backbone][3]
  if window is None or isinstance(window, str):
    window = parse_window(window, config.data.crop_size, patch)
  else:
    window = parse_window(",".join(map(str, window)), (), patch)
  params, source = load_params(config, workdir)
  forward = window_forward(config.model, params)
  shapes = jax.eval_shape(forward, jax.ShapeDtypeStruct((1, *window, 3), "float32"))
  names = [name for name in OUTPUT_NAMES if name in shapes]
  outputs = {name: (list(shapes[name].shape), str(shapes[name].dtype)) for name in names}

  if fmt == "stablehlo":
    exported = export_stablehlo(forward, window, batch, platforms)
    with errors.writing(output):
      epath.Path(output).write_bytes(exported.serialize())
    extra = {"platforms": list(exported.platforms), "jax_version": jax.__version__,
             "call": "jax.export.deserialize(bytes).call(windows) -> {name: array}"}
  else:
    if batch is None and decoder_spec(config.model).selects_topk:
      batch = 1
      logging.info("ONNX of a top-k head: fixed batch 1 (jax2onnx cannot trace MLSeg's "
                   "gating at a symbolic batch; --batch N sets another)")
    model = export_onnx(forward, window, batch, names, opset)
    with errors.writing(output):
      _write_onnx(model, output)
    import jax2onnx

    extra = {"opset": opset, "jax2onnx_version": getattr(jax2onnx, "__version__", None)}
  content = sidecar(config, fmt=fmt, window=window, batch=batch, outputs=outputs,
                    source=source, **extra)
  with errors.writing(meta):
    epath.Path(meta).write_text(json.dumps(content, indent=2) + "\n")
  return content


# ---------------------------------------------------------------------------------------
# The command line.


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/NAME.py); default: the --workdir's config.json. "
      "Overrides such as --config.init_from=WEIGHTS apply.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A training run: its latest checkpoint is exported.")
  flags.DEFINE_enum("format", None, list(FORMATS), "What to write.", required=True)
  flags.DEFINE_string("output", None, "The file to write (and OUTPUT.json beside it).",
                      required=True)
  flags.DEFINE_string("window", None, "Window size: 512 or height,width (default: the "
                      "config's data.crop_size, the evaluation's window).")
  flags.DEFINE_integer("batch", None, "Fixed number of windows per call (default: symbolic "
                       "where the format allows it; 1 for the ONNX of top-k heads).")
  flags.DEFINE_list("platforms", None, "stablehlo: the platforms to lower for, e.g. "
                    "cpu,cuda (default: this machine's).")
  flags.DEFINE_integer("opset", ONNX_OPSET, "onnx: the ONNX opset.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def _not_library_chatter(record) -> bool:
  """Orbax's and etils' INFO lines on restoring stay out of the command's output."""
  return record.levelno >= pylogging.WARNING or not any(
      f"/{lib}/" in record.pathname for lib in ("orbax", "etils", "jax2onnx", "onnx_ir"))


def main(argv) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_not_library_chatter)
  f = flags.FLAGS
  if f.platforms and f.format != "stablehlo":
    raise errors.UsageError("--platforms is for --format stablehlo")
  content = export(f.config, f.workdir, f.format, f.output, window=f.window, batch=f.batch,
                   platforms=f.platforms, opset=f.opset, overwrite=f.overwrite)
  shape = lambda s: "(" + ", ".join(map(str, s)) + ")"
  outs = ", ".join(f"{name} {shape(o['shape'])}" for name, o in content["outputs"].items())
  print(f"wrote {f.output} ({f.format}: {INPUT_NAME} {shape(content['input']['shape'])} -> "
        f"{outs}) and {f.output}.json")


def _run_cli() -> None:
  # Run the imported module, not this `__main__` copy (as convert.py does).
  from mlseg_jax import export as export_lib

  export_lib._define_flags()
  errors.run(export_lib.main, module="mlseg_jax.export")


if __name__ == "__main__":
  _run_cli()
