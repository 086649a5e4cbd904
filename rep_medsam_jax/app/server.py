"""The app's HTTP side: a Starlette application over one :class:`Segmenter`.

Security (the app serves patient images): it listens on 127.0.0.1 unless told otherwise; every
request, the page included, must carry the random token printed at launch (``?token=`` or the
``X-Token`` header), as Jupyter does; a Host header other than the address it listens on is
refused (DNS rebinding); files are read only under the folders (or the files) named at launch,
after resolving links, so ``..`` and symbolic links cannot leave them; uploads are size-limited
and kept in a private temporary folder; the page loads nothing from elsewhere.

A bad file or a failed inference answers with ``{"error": message}`` (400 for a problem with the
input, 500 otherwise); the server keeps running and no file already saved is touched.
"""

from __future__ import annotations

import atexit
import dataclasses
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rep_medsam_jax.app.documents import CT_PRESETS, Document, read_for_viewing
from rep_medsam_jax.io import CaseError, discover_cases
from rep_medsam_jax.io import SUPPORTED_SUFFIXES
from rep_medsam_jax.predictor.segmenter import Cancelled, Segmenter

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 1 << 30          # 1 GiB
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _png(pixels: np.ndarray) -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG bytes (fast compression: sent, not stored)."""
    import cv2  # noqa: PLC0415

    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


class TokenMiddleware:
    """Refuse (403) every HTTP request without the launch token."""

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._allowed(scope):
            response = JSONResponse({"error": "missing or wrong token: open the URL printed "
                                              "by `rep-medsam app`"}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"x-token", b"")
        if not given:
            from urllib.parse import parse_qs  # noqa: PLC0415

            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            given = values[0].encode() if values else b""
        return secrets.compare_digest(given, self._token)


@dataclasses.dataclass
class Job:
    """One propagation running in the background."""

    doc_id: str
    cancel: threading.Event
    done: int = 0
    total: int = 0
    state: str = "running"          # running | done | cancelled | failed
    error: str | None = None


class AppState:
    """The open documents, the launch folders, the jobs and the one segmenter."""

    def __init__(self, segmenter: Segmenter, paths: list[Path], max_upload: int):
        self.segmenter = segmenter
        self.roots = [p.resolve() for p in paths if p.is_dir()]
        self.files = [p.resolve() for p in paths if not p.is_dir()]
        self.max_upload = max_upload
        self.docs: dict[str, Document] = {}
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()           # the documents' masks and cases
        self.segmenters: dict[str, Segmenter] = {}   # one per document: model, cache shared
        self.upload_dir = Path(tempfile.mkdtemp(prefix="rep_medsam_app_"))
        atexit.register(shutil.rmtree, self.upload_dir, ignore_errors=True)

    # ---- files -------------------------------------------------------------------------------

    def listing(self) -> list[dict]:
        entries = []
        for root in self.roots:
            for path in discover_cases(root):
                if path.resolve().is_relative_to(root):      # not links leading elsewhere
                    entries.append({"path": str(path), "name": str(path.relative_to(root)),
                                    "root": str(root)})
        entries += [{"path": str(p), "name": p.name, "root": str(p.parent)} for p in self.files]
        return entries

    def allowed_path(self, text: str) -> Path:
        """A path the page asks for -> the resolved path, if it lies under a launch folder or
        is a launch file; else 403."""
        path = Path(text)
        if not path.is_absolute():
            if not self.roots:
                raise HttpError(403, f"{text}: not a path the app was started with")
            path = self.roots[0] / path
        resolved = path.resolve()
        if resolved in self.files or any(resolved.is_relative_to(r) for r in self.roots):
            if not resolved.exists():
                raise HttpError(404, f"{text}: no such file or folder")
            return resolved
        raise HttpError(403, f"{text}: outside the folders the app was started with")

    def open(self, path: Path, uploaded: bool = False) -> Document:
        case = read_for_viewing(path)
        doc = Document(id=uuid.uuid4().hex[:12], case=case, uploaded=uploaded)
        segmenter = self.segmenter.sibling()
        self._set_image(segmenter, doc)
        with self.lock:
            self.docs[doc.id] = doc
            self.segmenters[doc.id] = segmenter
        return doc

    @staticmethod
    def _set_image(segmenter: Segmenter, doc: Document) -> None:
        """A volume costs nothing until a slice is shown; a 2D image is encoded now."""
        if doc.is_3d:
            segmenter.set_volume(doc.case.image)
        else:
            segmenter.set_image(doc.case.image)

    def reread(self, doc: Document, level: float, width: float) -> None:
        """Apply a CT window: the case is read again with it, so the model sees it too."""
        if not doc.can_window:
            raise HttpError(400, "a CT window applies to NIfTI and DICOM inputs only")
        if not width > 0:
            raise HttpError(400, f"window width must be positive, got {width:g}")
        case = read_for_viewing(doc.case.source, "CT", (level, width))
        with self.lock:
            doc.case, doc.modality, doc.ct_window = case, "CT", (level, width)
            self._set_image(self.segmenters[doc.id], doc)

    def doc(self, doc_id: str) -> Document:
        doc = self.docs.get(doc_id)
        if doc is None:
            raise HttpError(404, f"no open document {doc_id!r}")
        return doc



def _int(data: dict, key: str) -> int:
    try:
        return int(data[key])
    except (KeyError, TypeError, ValueError):
        raise HttpError(400, f"'{key}' must be an integer") from None


def _box(data: dict, doc: Document) -> np.ndarray:
    try:
        box = np.asarray(data["box"], float).reshape(4)
    except (KeyError, TypeError, ValueError):
        raise HttpError(400, "'box' must be [x0, y0, x1, y1]") from None
    height, width = doc.hw
    box = np.array([min(box[0], box[2]), min(box[1], box[3]),
                    max(box[0], box[2]), max(box[1], box[3])])
    if not np.all(np.isfinite(box)) or box[0] < 0 or box[1] < 0 or box[2] > width \
            or box[3] > height:
        raise HttpError(400, f"box {box.tolist()} lies outside the {width}x{height} image")
    return box


def _doc_info(doc: Document) -> dict:
    return {"id": doc.id, "name": doc.case.name, "is_3d": doc.is_3d, "depth": doc.depth,
            "height": doc.hw[0], "width": doc.hw[1], "labels": doc.labels_used(),
            "notes": list(doc.case.notes), "can_window": doc.can_window,
            "ct_window": doc.ct_window, "formats": doc.save_formats(),
            "uploaded": doc.uploaded, "can_undo": bool(doc.history)}


def create_app(segmenter: Segmenter, paths: list[Path], token: str,
               allowed_hosts: list[str] | None = None,
               max_upload: int = DEFAULT_MAX_UPLOAD) -> Starlette:
    """The ASGI application. ``paths``: the launch files and folders (the only readable ones)."""
    state = AppState(segmenter, [Path(p) for p in paths], max_upload)

    async def index(request: Request) -> Response:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{TOKEN}}", token),
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = STATIC / name
        if name not in _ASSETS or not path.is_file():
            raise HttpError(404, f"no asset {name}")
        return FileResponse(path, headers={"Content-Security-Policy": _CSP})

    def files(request: Request) -> Response:
        return JSONResponse({"files": state.listing(), "presets": CT_PRESETS,
                             "max_upload": state.max_upload})

    async def open_path(request: Request) -> Response:
        data = await _json(request)
        path = state.allowed_path(str(data.get("path", "")))
        doc = await _threaded(state.open, path)
        return JSONResponse(_doc_info(doc))

    async def upload(request: Request) -> Response:
        name = _SAFE_NAME.sub("_", Path(request.query_params.get("name", "")).name)
        if not name.lower().endswith(SUPPORTED_SUFFIXES) or name.startswith("."):
            raise HttpError(400, f"{name or 'the file'}: unsupported type; expected one of "
                                 f"{', '.join(SUPPORTED_SUFFIXES)}")
        declared = int(request.headers.get("content-length") or 0)
        if declared > state.max_upload:
            raise HttpError(413, f"{name}: {declared} bytes, over the upload limit of "
                                 f"{state.max_upload}")
        folder = state.upload_dir / uuid.uuid4().hex[:12]
        folder.mkdir()
        target, size = folder / name, 0
        with open(target, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > state.max_upload:
                    handle.close()
                    shutil.rmtree(folder, ignore_errors=True)
                    raise HttpError(413, f"{name}: over the upload limit of "
                                         f"{state.max_upload} bytes")
                handle.write(chunk)
        try:
            doc = await _threaded(state.open, target, True)
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            # The message names the file as the user knows it, not the private folder.
            raise HttpError(400 if isinstance(err, ValueError) else 500,
                            str(err).replace(str(target), name)) from None
        return JSONResponse(_doc_info(doc))

    def info(request: Request) -> Response:
        return JSONResponse(_doc_info(state.doc(request.path_params["doc"])))

    def slice_png(request: Request) -> Response:
        doc = state.doc(request.path_params["doc"])
        z = int(request.path_params["z"])
        pixels = doc.slice_pixels(z)
        if doc.is_3d:
            state.segmenters[doc.id].focus(z)      # encode around it while the user looks
        return Response(_png(pixels), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    def labels_png(request: Request) -> Response:
        doc = state.doc(request.path_params["doc"])
        return Response(_png(doc.label_slice(int(request.path_params["z"]))),
                        media_type="image/png", headers={"Cache-Control": "no-store"})

    async def box(request: Request) -> Response:
        data = await _json(request)
        doc = state.doc(request.path_params["doc"])
        z, label = _int(data, "z"), Document.check_label(_int(data, "label"))
        bbox = _box(data, doc)

        def run():
            start = time.perf_counter()
            masks, scores = state.segmenters[doc.id].predict_slice(z, bbox)
            with state.lock:
                doc.set_masks(label, {z: masks[0]})
                labels = doc.label_slice(z)
            return labels, float(scores[0]), time.perf_counter() - start

        labels, score, seconds = await _threaded(run)
        return Response(_png(labels), media_type="image/png",
                        headers={"X-Score": f"{score:.4f}", "X-Seconds": f"{seconds:.4f}",
                                 "Cache-Control": "no-store"})

    async def propagate(request: Request) -> Response:
        data = await _json(request)
        doc = state.doc(request.path_params["doc"])
        if not doc.is_3d:
            raise HttpError(400, "propagation needs a volume")
        label = Document.check_label(_int(data, "label"))
        bbox = _box(data, doc)
        z0, z1 = sorted((_int(data, "z0"), _int(data, "z1")))
        box3d = np.array([bbox[0], bbox[1], z0, bbox[2], bbox[3], z1])
        job_id = uuid.uuid4().hex[:12]
        job = state.jobs[job_id] = Job(doc.id, threading.Event())
        case = doc.case

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def run() -> None:
            try:
                mask = state.segmenters[doc.id].propagate(box3d, progress=progress,
                                                          cancel=job.cancel)
                with state.lock:
                    if doc.case is not case:
                        raise RuntimeError("the image changed (new window) during propagation")
                    low, high = max(z0, 0), min(z1, doc.depth - 1)
                    doc.set_masks(label, {z: mask[z] for z in range(low, high + 1)})
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as err:  # noqa: BLE001  (reported in the page)
                job.state, job.error = "failed", f"{type(err).__name__}: {err}"

        threading.Thread(target=run, daemon=True, name=f"propagate-{job_id}").start()
        return JSONResponse({"job": job_id})

    def job_status(request: Request) -> Response:
        job = state.jobs.get(request.path_params["job"])
        if job is None:
            raise HttpError(404, "no such job")
        return JSONResponse({"state": job.state, "done": job.done, "total": job.total,
                             "error": job.error})

    def job_cancel(request: Request) -> Response:
        job = state.jobs.get(request.path_params["job"])
        if job is None:
            raise HttpError(404, "no such job")
        job.cancel.set()
        return JSONResponse({"ok": True})

    async def delete(request: Request) -> Response:
        data = await _json(request)
        doc = state.doc(request.path_params["doc"])
        z = data.get("z")
        with state.lock:
            doc.delete(_int(data, "label"), None if z is None else _int(data, "z"))
        return JSONResponse(_doc_info(doc))

    def undo(request: Request) -> Response:
        doc = state.doc(request.path_params["doc"])
        with state.lock:
            doc.undo()
        return JSONResponse(_doc_info(doc))

    async def window(request: Request) -> Response:
        data = await _json(request)
        doc = state.doc(request.path_params["doc"])
        try:
            level, width = float(data["level"]), float(data["width"])
        except (KeyError, TypeError, ValueError):
            raise HttpError(400, "'level' and 'width' must be numbers") from None
        await _threaded(state.reread, doc, level, width)
        return JSONResponse(_doc_info(doc))

    async def save(request: Request) -> Response:
        data = await _json(request)
        doc = state.doc(request.path_params["doc"])
        fmt = str(data.get("format", ""))
        if data.get("download"):
            name, content = await _threaded(doc.save_bytes, fmt)
            return Response(content, media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
        path = await _threaded(doc.save_beside, fmt)
        return JSONResponse({"path": str(path)})

    async def on_error(request: Request, err: Exception) -> Response:
        if isinstance(err, HttpError):
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if isinstance(err, (CaseError, ValueError, IndexError)):
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)

    routes = [
        Route("/", index), Route("/static/{name}", static), Route("/api/files", files),
        Route("/api/open", open_path, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/doc/{doc}", info),
        Route("/api/doc/{doc}/slice/{z:int}.png", slice_png),
        Route("/api/doc/{doc}/labels/{z:int}.png", labels_png),
        Route("/api/doc/{doc}/box", box, methods=["POST"]),
        Route("/api/doc/{doc}/propagate", propagate, methods=["POST"]),
        Route("/api/doc/{doc}/delete", delete, methods=["POST"]),
        Route("/api/doc/{doc}/undo", undo, methods=["POST"]),
        Route("/api/doc/{doc}/window", window, methods=["POST"]),
        Route("/api/doc/{doc}/save", save, methods=["POST"]),
        Route("/api/jobs/{job}", job_status),
        Route("/api/jobs/{job}/cancel", job_cancel, methods=["POST"]),
    ]
    middleware = [Middleware(TokenMiddleware, token=token)]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={Exception: on_error, HttpError: on_error,
                                        ValueError: on_error, IndexError: on_error})
    app.state.app_state = state
    return app


_ASSETS = {"app.js", "app.css"}
# Nothing but this server: no scripts, styles, images or connections from anywhere else.
_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")


async def _json(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        raise HttpError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return data


async def _threaded(function, *args):
    """Run blocking work (reading, encoding, writing) off the event loop."""
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

    return await run_in_threadpool(function, *args)


def new_token() -> str:
    return secrets.token_urlsafe(24)


