"""Start the app: uvicorn on 127.0.0.1, a fresh token, the URL printed (or a server in a
thread, for tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

from rep_medsam_jax.app.server import DEFAULT_MAX_UPLOAD, create_app, new_token
from rep_medsam_jax.predictor.segmenter import Segmenter

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_paths(paths: list[str | Path]) -> list[Path]:
    """The launch files and folders, each of which must exist."""
    checked = []
    for text in paths:
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        checked.append(path)
    return checked


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _allowed_hosts(host: str) -> list[str]:
    return [*LOCAL_HOSTS, host] if host not in ("0.0.0.0", "::") else ["*"]


@dataclasses.dataclass
class RunningApp:
    """A server started by :func:`start_in_thread`: its base URL, token and stop()."""

    url: str
    token: str
    server: object
    thread: threading.Thread
    app: object

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(segmenter: Segmenter, paths: list[Path], port: int | None = None,
                    max_upload: int = DEFAULT_MAX_UPLOAD) -> RunningApp:
    """Serve on 127.0.0.1:port (a free one by default) from a background thread."""
    import uvicorn  # noqa: PLC0415

    host, token = "127.0.0.1", new_token()
    port = port or free_port(host)
    app = create_app(segmenter, paths, token, _allowed_hosts(host), max_upload)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="rep-medsam-app")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start on {host}:{port}")
        time.sleep(0.02)
    return RunningApp(f"http://{host}:{port}", token, server, thread, app)


def serve(paths: list[str | Path], model: str, backend: str | None = None, host: str =
          "127.0.0.1", port: int = 8765, threads: int | None = None, int8: bool = False,
          cache_mb: int = 1024, max_upload_mb: int = DEFAULT_MAX_UPLOAD >> 20,
          open_browser: bool = False) -> None:
    """Run the app until interrupted (Ctrl+C)."""
    import uvicorn  # noqa: PLC0415

    launch = check_paths(paths)
    segmenter = Segmenter(model, backend, threads=threads, int8=int8,
                          cache_bytes=cache_mb << 20)
    token = new_token()
    app = create_app(segmenter, launch, token, _allowed_hosts(host), max_upload_mb << 20)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/?token={token}"
    print(f"Rep-MedSAM app: open {url}\n(files under: "
          f"{', '.join(str(p) for p in launch) or 'none; upload files in the page'}; "
          "Ctrl+C stops)", flush=True)
    if host not in LOCAL_HOSTS:
        print(f"warning: listening on {host}: other machines can reach the app (the token "
              "still guards it; traffic is not encrypted)", flush=True)
    if open_browser:
        import webbrowser  # noqa: PLC0415

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
