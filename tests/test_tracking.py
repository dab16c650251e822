"""Experiment tracking: TensorBoard and Weights & Biases (offline: no network) get the
training scalars, the evaluation scalars and the evaluation's pictures under the same names."""

import json
import struct
import sys

import pytest

from mlseg_jax import errors
from mlseg_jax.evaluation import modes
from mlseg_jax import tracking
from mlseg_jax import train
from mlseg_jax.main import validate_config
from test_train import random_batches, tiny_train_config

_BLOCK, _HEADER = 32768, 7  # The .wandb file: a 7-byte header, then LevelDB log blocks.


def wandb_records(path):
  """(kind, {key: value}) of the history and summary records of an offline run's .wandb
  file, decoded with wandb's own protobuf (values as the Python objects they encode)."""
  from wandb.proto import wandb_internal_pb2

  data, pos, chunks, out = path.read_bytes(), _HEADER, b"", []
  while pos + 7 <= len(data):
    if _BLOCK - pos % _BLOCK < 7:  # A block's tail too short for a header is padding.
      pos += _BLOCK - pos % _BLOCK
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if n == 0 and kind == 0:
      break
    chunks += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):  # A whole record, or the last piece of one.
      record = wandb_internal_pb2.Record.FromString(chunks)
      chunks = b""
      which = record.WhichOneof("record_type")
      items = (record.history.item if which == "history" else
               record.summary.update if which == "summary" else None)
      if items is not None:
        out.append((which, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in items}))
  return out


def _offline(monkeypatch, tmp_path):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  (tmp_path / "wandb_dir").mkdir()


def test_a_training_run_logs_its_scalars_and_evaluation_pictures_to_wandb_offline(
    tmp_path, monkeypatch):
  _offline(monkeypatch, tmp_path)
  config = tiny_train_config(decoder="mlseg", total_steps=4, log_every=2, checkpoint_every=4,
                             eval_every=4)
  config.eval.stride = (64, 64)
  config.eval.max_images = 1
  config.logging.tensorboard_images = 1
  config.logging.wandb = True
  config.logging.wandb_mode = "offline"
  config.logging.wandb_tags = ("test",)
  validate_config(config, num_devices=1)
  workdir = tmp_path / "run"
  tracker = tracking.open_tracker(config, workdir)
  evaluate_fn = modes.periodic_eval_fn(config, workdir, tracker=tracker)
  _, last = train.train(config, workdir, data_iter=random_batches(), evaluate_fn=evaluate_fn,
                        tracker=tracker)

  (run_dir,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
  assert run_dir.name.endswith((workdir / tracking.WANDB_ID_FILE).read_text().strip())
  records = wandb_records(next(run_dir.glob("run-*.wandb")))
  history = [values for kind, values in records if kind == "history"]
  assert [h["_step"] for h in history if "train/loss" in h] == [2, 4]
  summary = {}
  for kind, values in records:
    if kind == "summary":
      summary.update(values)
  assert summary["train/loss"] == pytest.approx(last["loss"])  # The final loss.
  assert summary["eval/ss/mIoU"] == pytest.approx(
      json.loads((workdir / "evaluations.json").read_text())["steps"]["4"]["ss/mIoU"])
  pictures = {h["_step"]: sorted(k.rsplit("/", 1)[0] for k in h if k.endswith("/_type"))
              for h in history if any(k.endswith("/_type") for k in h)}
  assert pictures == {4: ["eval/ss/confusion", "eval/ss/iou", "eval/ss/sample_0"]}
  media = sorted(p.name.split("_")[0] for p in
                 (run_dir / "files" / "media" / "images" / "eval" / "ss").iterdir())
  assert media == ["confusion", "iou", "sample"]


def test_a_resumed_training_run_continues_its_wandb_run(tmp_path, monkeypatch):
  _offline(monkeypatch, tmp_path)
  config = tiny_train_config()
  config.logging.wandb, config.logging.wandb_mode = True, "offline"
  ids = []
  for _ in range(2):
    run = tracking.start_wandb(config.logging, config, tmp_path / "run", "train")
    ids.append(run.id)
    run.finish()
  assert ids[0] == ids[1] == (tmp_path / "run" / tracking.WANDB_ID_FILE).read_text().strip()


def test_wandb_missing_is_one_line_naming_the_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
  config = tiny_train_config()
  config.logging.wandb = True
  with pytest.raises(errors.UserError, match="pip install wandb") as raised:
    tracking.open_tracker(config, tmp_path)
  assert "\n" not in str(raised.value)
  assert not (tmp_path / "tensorboard").exists()  # Refused before anything was opened.


def test_logging_fields_are_checked():
  config = tiny_train_config()
  config.logging.wandb_mode = "offlne"
  config.logging.tensorboard_images = -1
  with pytest.raises(errors.ConfigError) as raised:
    validate_config(config, num_devices=1)
  assert "logging.wandb_mode='offlne' must be one of" in str(raised.value)
  assert "logging.tensorboard_images=-1" in str(raised.value)


def test_a_tensorboard_writer_given_up_with_its_queue_full_stops_its_thread(tmp_path,
                                                                             monkeypatch):
  # A disk that refuses the flush while the writer's thread is behind (its queue of 10
  # full): the thread must end, else it dies at exit on the closed queue with a traceback.
  import threading
  import time

  from tensorboardX import event_file_writer

  from mlseg_jax.tensorboard import open_summary_writer

  write, flush = event_file_writer.EventsWriter.write_event, event_file_writer.EventsWriter.flush

  def slow(self, event):
    time.sleep(0.05)
    return write(self, event)

  def full(self):
    if threading.current_thread() is threading.main_thread():
      raise OSError(28, "No space left on device")
    return flush(self)

  monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", slow)
  monkeypatch.setattr(event_file_writer.EventsWriter, "flush", full)
  writer = open_summary_writer(tmp_path / "tensorboard")
  worker = next(iter(writer.all_writers.values())).event_writer._worker
  tracker = tracking.Tracker(writer)
  with pytest.raises(errors.FilesystemError, match="no space left on device"):
    tracker.scalars(1, {f"scalar_{i}": 1.0 for i in range(30)})
  assert not worker.is_alive()
  tracker.close()  # Writes nothing more, raises nothing.
