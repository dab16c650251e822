"""TensorBoard event files in a local directory or a remote one (`gs://`, through etils.epath).

tensorboardX writes local files itself. For `gs://` it has a writer of its own on
google-cloud-storage, which uploads its buffer again when it is garbage collected, retrying
for two minutes when the bucket cannot be reached (at exit, say). Here a remote directory's
events are written to a local temporary directory instead, and every `flush()` and `close()`
copies the event files that changed, whole, to the remote directory through epath (a GCS
object is rewritten whole anyway). `flush()` copies what tensorboardX has written so far, as
a local flush writes it to disk; `close()` copies everything.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath
from tensorboardX import SummaryWriter

from mlseg_jax import errors
from mlseg_jax.paths import is_remote


def open_summary_writer(directory: str | os.PathLike) -> SummaryWriter:
  """A tensorboardX SummaryWriter (add_scalar, add_image, ..., flush, close) for `directory`."""
  directory = os.fspath(directory)
  with errors.writing(directory):  # A read-only or full workdir: one line naming it.
    if not is_remote(directory):
      return SummaryWriter(directory)
    return _MirroredSummaryWriter(directory)


class _MirroredSummaryWriter(SummaryWriter):
  """Writes to a local temporary directory, mirrored to `remote` on flush and close."""

  def __init__(self, remote: str):
    self._remote = epath.Path(remote)
    self._staging = tempfile.mkdtemp(prefix="tensorboard-")
    self._copied: dict[str, int] = {}  # Relative path -> size last copied.
    super().__init__(self._staging)

  def flush(self):
    super().flush()
    self._copy()

  def close(self):
    super().close()
    self._copy()
    shutil.rmtree(self._staging, ignore_errors=True)
    self._copied.clear()

  def _copy(self):
    for root, _, files in os.walk(self._staging):
      for name in files:
        path = os.path.join(root, name)
        relative = os.path.relpath(path, self._staging)
        size = os.path.getsize(path)
        if self._copied.get(relative) == size:
          continue  # Event files only grow: unchanged.
        with open(path, "rb") as f:
          data = f.read()
        target = self._remote / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self._copied[relative] = len(data)
