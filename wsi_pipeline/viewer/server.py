"""`wsi-pipeline view RUN`: a read-only local web viewer (stdlib ThreadingHTTPServer).

Routes (GET and HEAD only; anything else 405):
    /                                   the viewer page (static/viewer.html)
    /static/NAME                        the page's script and OpenSeadragon (a fixed list of files)
    /api/slides                         slides of the manifest with labels, predictions, overlays
    /slides/ID.dzi, /slides/ID_files/L/C_R.jpeg    Deep Zoom tiles of a manifest slide
    /overlay/ID/heatmap/MODEL.png       the heatmap as an RGBA image over the slide
    /overlay/ID/tissue.json, /overlay/ID/lesion.json, /overlay/ID/detections/MODEL.json
    /report/PATH                        files of RUN/report (the report links back to the viewer)
What it serves: the run's outputs (each resolved, symlinks followed, and refused unless inside
RUN) and the manifest's slides, only as tiles read through wsi_pipeline.slides: a slide is looked
up by id in the manifest, never built from the request. Bad ids, coordinates, levels, models or
paths are 4xx with a one-line message; an unexpected error is a 500 without a traceback.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..run.names import is_safe_name
from .deepzoom import DeepZoom, TileRequestError
from .overlays import OutsideRun, RunFiles, detections, heatmap_png, polygons

log = logging.getLogger("wsi_pipeline")
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Exactly these files are served from the package (no path from the request reaches the disk).
STATIC_FILES = {
    "viewer.js": "viewer.js",
    "viewer.css": "viewer.css",
    "openseadragon.min.js": "openseadragon/openseadragon.min.js",
    "LICENSE-openseadragon.txt": "openseadragon/LICENSE.txt",
}
TILE_RE = re.compile(r"^/slides/([^/]+)_files/(\d{1,3})/(\d{1,7})_(\d{1,7})\.jpeg$")
MAX_OPEN_SLIDES = 8


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ViewerState:
    """What the handlers share: the run, the manifest's slides, open slides (LRU), cached overlays."""

    def __init__(self, run: Path, manifest=None):
        from ..report import collect

        self.run = Path(run).resolve()
        self.files = RunFiles(self.run)
        self.slides = {}
        for r in manifest or []:
            if not getattr(r, "is_volume", False) and is_safe_name(r.slide_id):
                self.slides[r.slide_id] = r
        self._open: OrderedDict[str, DeepZoom] = OrderedDict()
        self._heatmaps: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.results = collect.cohort_results(self.run)

    def deepzoom(self, slide_id: str) -> DeepZoom:
        record = self.slides.get(slide_id)
        if record is None:
            raise HttpError(404, f"no slide {slide_id!r} in the manifest")
        with self._lock:
            dz = self._open.get(slide_id)
            if dz is not None:
                self._open.move_to_end(slide_id)
                return dz
        from ..errors import SlideError
        from ..slides import open_slide

        try:
            slide = open_slide(record.path, slide_id=slide_id, mpp_override=record.mpp)
        except SlideError as exc:
            raise HttpError(404, f"cannot open slide {slide_id}: {exc}") from None
        dz = DeepZoom(slide)
        with self._lock:
            self._open[slide_id] = dz
            while len(self._open) > MAX_OPEN_SLIDES:
                _, old = self._open.popitem(last=False)
                old.slide.close()
        return dz

    def heatmap(self, slide_id: str, model: str) -> tuple[bytes, dict]:
        key = (slide_id, model)
        with self._lock:
            if key in self._heatmaps:
                return self._heatmaps[key]
        dz = self.deepzoom(slide_id)
        value = heatmap_png(self.files, model, slide_id, (dz.width, dz.height))
        with self._lock:
            self._heatmaps[key] = value
            while len(self._heatmaps) > 32:
                self._heatmaps.popitem(last=False)
        return value

    def slide_list(self) -> list[dict]:
        heat_models = self.files.models("heatmaps")
        det_models = self.files.models("detect")
        out = []
        for sid, r in self.slides.items():
            preds = {}
            for res in self.results:
                row = next((p for p in res.predictions if p.get("slide_id") == sid), None)
                if row is not None:
                    preds[res.model] = {"cohort": res.cohort, "fold": row.get("fold"),
                                        "probs": {c: float(row[f"prob_{c}"]) for c in res.classes}}
            out.append({
                "slide_id": sid, "patient_id": r.patient_id, "label": r.label, "cohort": r.cohort,
                "predictions": preds,
                "heatmaps": [m for m in heat_models if self._exists("heatmaps", m, f"{sid}.geojson")],
                "detections": [m for m in det_models if self._exists("detect", m, f"{sid}.csv")],
                "tissue": self._exists("tiles", f"{sid}.tissue.geojson"),
                "lesion": self._exists("segment", f"{sid}.geojson"),
            })
        return out

    def _exists(self, *parts: str) -> bool:
        try:
            self.files.path(*parts)
            return True
        except (OutsideRun, FileNotFoundError):
            return False

    def close(self) -> None:
        with self._lock:
            for dz in self._open.values():
                dz.slide.close()
            self._open.clear()


class ViewerHandler(BaseHTTPRequestHandler):
    server_version = "wsi-pipeline-viewer"
    state: ViewerState   # set on the handler class made by make_server

    def log_message(self, fmt, *args):  # quiet by default; --verbose logging shows requests
        log.debug("viewer %s %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def _refuse(self):
        self._send(405, b"read-only viewer: GET and HEAD only\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _serve(self, head: bool):
        try:
            status, body, ctype = self._route()
        except HttpError as exc:
            status, body, ctype = exc.status, (exc.message + "\n").encode(), "text/plain; charset=utf-8"
        except (OutsideRun, TileRequestError) as exc:
            status, body, ctype = 404, f"{exc}\n".encode(), "text/plain; charset=utf-8"
        except FileNotFoundError as exc:
            status, body, ctype = 404, f"not found: {exc}\n".encode(), "text/plain; charset=utf-8"
        except (LookupError, ValueError, TypeError) as exc:   # an output the viewer cannot read
            status, body, ctype = 404, f"unusable: {exc}\n".encode(), "text/plain; charset=utf-8"
        except Exception:  # noqa: BLE001 — never a traceback to the client
            log.exception("viewer: %s failed", self.path)
            status, body, ctype = 500, b"internal error (see the viewer's log)\n", "text/plain; charset=utf-8"
        self._send(status, body, ctype, head=head)

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False, extra: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-cache")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self) -> tuple[int, bytes, str]:
        raw = urlsplit(self.path).path
        if "\\" in raw or "\x00" in raw:
            raise HttpError(400, "bad path")
        path = unquote(raw)
        if ".." in path.split("/") or "//" in path:
            raise HttpError(400, "bad path")
        state = self.state
        if path in ("/", "/index.html"):
            return 200, (STATIC_DIR / "viewer.html").read_bytes(), "text/html; charset=utf-8"
        if path.startswith("/static/"):
            name = STATIC_FILES.get(path[len("/static/"):])
            if name is None:
                raise HttpError(404, "no such static file")
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            return 200, (STATIC_DIR / name).read_bytes(), ctype
        if path == "/api/slides":
            body = json.dumps({"run": str(state.run), "slides": state.slide_list()}).encode()
            return 200, body, "application/json"
        if path.startswith("/slides/") and path.endswith(".dzi"):
            sid = path[len("/slides/"):-len(".dzi")]
            return 200, state.deepzoom(self._slide_id(sid)).dzi().encode(), "application/xml"
        m = TILE_RE.match(path)
        if m:
            dz = state.deepzoom(self._slide_id(m.group(1)))
            level, col, row = (int(v) for v in m.groups()[1:])
            if level > dz.max_level:
                raise HttpError(404, f"level {level} beyond the slide's deepest level {dz.max_level}")
            return 200, dz.tile_jpeg(level, col, row), "image/jpeg"
        if path.startswith("/slides/"):
            raise HttpError(404, "not a tile address (/slides/ID_files/LEVEL/COL_ROW.jpeg)")
        if path.startswith("/overlay/"):
            return self._overlay(path.split("/")[2:])
        if path.startswith("/report/") or path == "/report":
            parts = [p for p in path.split("/")[2:] if p] or ["index.html"]
            target = state.files.path("report", *parts)
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            return 200, target.read_bytes(), ctype
        raise HttpError(404, "not found")

    def _slide_id(self, sid: str) -> str:
        if not is_safe_name(sid) or sid not in self.state.slides:
            raise HttpError(404, f"no slide {sid!r} in the manifest")
        return sid

    def _overlay(self, parts: list[str]) -> tuple[int, bytes, str]:
        state = self.state
        if len(parts) < 2:
            raise HttpError(404, "no such overlay")
        sid = self._slide_id(parts[0])
        rest = parts[1:]
        if rest == ["tissue.json"]:
            return 200, json.dumps({"rings": polygons(state.files, "tiles", f"{sid}.tissue.geojson")}).encode(), \
                "application/json"
        if rest == ["lesion.json"]:
            return 200, json.dumps({"rings": polygons(state.files, "segment", f"{sid}.geojson")}).encode(), \
                "application/json"
        if len(rest) == 2 and rest[0] == "heatmap" and rest[1].endswith(".png"):
            png, _ = state.heatmap(sid, rest[1][:-4])
            return 200, png, "image/png"
        if len(rest) == 2 and rest[0] == "heatmap-info" and rest[1].endswith(".json"):
            _, info = state.heatmap(sid, rest[1][:-5])
            return 200, json.dumps(info).encode(), "application/json"
        if len(rest) == 2 and rest[0] == "detections" and rest[1].endswith(".json"):
            return 200, json.dumps(detections(state.files, rest[1][:-5], sid)).encode(), "application/json"
        raise HttpError(404, "no such overlay")


def make_server(run: Path, manifest=None, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    state = ViewerState(run, manifest)
    handler = type("BoundViewerHandler", (ViewerHandler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.viewer_state = state
    return server


def serve(run: Path, manifest=None, host: str = "127.0.0.1", port: int = 8000) -> int:
    if manifest is None:
        from ..errors import PipelineError

        raise PipelineError(f"no manifest for {run}: pass --manifest (or run `wsi-pipeline report {run} "
                            f"--manifest M` once, which records it in RUN/report/run.json)")
    server = make_server(run, manifest, host, port)
    url_host = host if ":" not in host else f"[{host}]"
    print(f"viewer: http://{url_host}:{server.server_address[1]}/  ({len(server.viewer_state.slides)} slides "
          f"of {run}; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {host}: other machines can read this run's slides and results", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.viewer_state.close()
    return 0
