"""A local Google Cloud Storage server for tests: gcp-storage-emulator (a real HTTP server of the
JSON API, from PyPI) in a subprocess on a free loopback port, and the environment that points
gcsfs, tensorstore (orbax) and array_record's reader at it.

One gap of the emulator is filled when it is started from here (``python -m tests.gcs_emulator``
= its command line): GCS answers a media download with the object's ``x-goog-generation`` header,
which tensorstore needs for its conditional reads (orbax's OCDBT manifest); the emulator
omits it, so it is added from the emulator's own object record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emulator_environment(endpoint: str) -> dict[str, str]:
    """The variables that send every client to ``endpoint`` with no credential look-up."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,                 # gcsfs (etils.epath, tfds metadata)
        "FSSPEC_GS_TOKEN": "anon",                         # gcsfs: no credential search
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",      # gcsfs: no bucket-layout gRPC call
        "TENSORSTORE_GCS_HTTP_URL": endpoint,              # tensorstore (orbax arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",       # tensorstore: a fixed token
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,       # array_record's GCS reader
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",  # the server is on this machine
    }


@contextlib.contextmanager
def gcs_emulator(folder: Path, bucket: str) -> Iterator[dict[str, str]]:
    """Run the emulator (objects kept under ``folder``) with ``bucket`` created; yield the
    environment for it. The server is stopped on exit."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tests.gcs_emulator", "--data-dir", str(folder),
               "start", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", bucket,
               "--quiet"]
    log = open(folder.parent / f"{folder.name}-emulator.log", "w")  # noqa: SIM115
    repo = Path(__file__).resolve().parents[1]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        deadline = time.monotonic() + 60
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:          # ready when it answers for the bucket
            if server.poll() is not None:
                raise RuntimeError(f"the storage emulator exited with {server.returncode}: "
                                   + Path(log.name).read_text())
            with contextlib.suppress(OSError):
                with direct.open(f"{endpoint}/storage/v1/b/{bucket}", timeout=2):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the storage emulator did not answer within 60 s")
            time.sleep(0.2)
        yield emulator_environment(endpoint)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def this_process_uses(environment: dict[str, str]) -> Iterator[None]:
    """Point this process's clients at the emulator (for checks made in the test itself):
    the variables, fsspec's configuration (read when fsspec was imported) and gcsfs's plain
    file system (the variant that looks up bucket layouts is chosen when gcsfs is imported)."""
    saved_env = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    import fsspec  # noqa: PLC0415
    import gcsfs  # noqa: PLC0415  (after the variables: it reads one when imported)

    saved_conf = {k: fsspec.config.conf.get(k) for k in ("gs", "gcs")}
    for protocol in ("gs", "gcs"):
        fsspec.config.conf[protocol] = {"token": "anon"}
        if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:     # imported earlier
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    try:
        yield
    finally:
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for protocol, value in saved_conf.items():
            if value is None:
                fsspec.config.conf.pop(protocol, None)
            else:
                fsspec.config.conf[protocol] = value


def _serve(argv: list[str]) -> int:
    """The emulator's command line, with media downloads carrying their generation headers."""
    from gcp_storage_emulator import __main__ as emulator  # noqa: PLC0415
    from gcp_storage_emulator.handlers import objects  # noqa: PLC0415

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):        # a missing object: the 404 stands
            record = storage.get_file_obj(request.params["bucket_name"],
                                          request.params["object_id"])
            response["x-goog-generation"] = str(record["generation"])
            response["x-goog-metageneration"] = str(record["metageneration"])

    objects.download = download_with_generation
    return emulator.main(argv)


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
