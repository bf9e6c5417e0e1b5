"""`graphkit serve OUT_DIR`: a local page to try a converted folder in the browser with Transformers.js.

The page (``graphkit/serve_page/``) picks dtype and device (wasm, webgpu), sends a prompt through the model's
chat template, streams the tokens and shows load time, prefill and decode speed; two dtypes can run on the same
prompt side by side with their token agreement.

What is served, and nothing else (stdlib ``http.server``, one thread per request):

    /                      the page (serve_page/index.html)
    /app/<file>            the page's own files (serve_page/)
    /api/info.json         the folder's dtypes, sizes, targets and the client versions
    /tjs/<file>            the installed @huggingface/transformers dist/ (no CDN: nothing outside the machine)
    /ort/<file>            the onnxruntime-web dist/ that Transformers.js build depends on
    /models/<name>/<file>  the converted folder

Paths are decoded once and refused (403) when a segment is ``..``, holds a backslash or NUL, or when the
resolved file (symlinks followed) lies outside its root; anything else not found is 404. Every response
carries COOP/COEP (+CORP) so the page is cross-origin isolated and onnxruntime-web's wasm can use threads.
Binds 127.0.0.1 unless ``host`` is given.
"""
from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from graphkit.errors import GraphkitError
from graphkit.tjs_contract import DTYPE_FILES, OUTPUT_FILES, TJS_CONFIG, USE_EXTERNAL_DATA, external_data_name

PAGE_DIR = Path(__file__).resolve().parent / "serve_page"
DEFAULT_NODE_MODULES = Path(__file__).resolve().parents[1] / "tests" / "js" / "node_modules"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".json": "application/json; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".map": "application/json; charset=utf-8", ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8", ".jinja": "text/plain; charset=utf-8",
}
_MODEL_ID = re.compile(r"[\w\-.]{1,96}")


def check_folder(folder: Path, dtypes: list[str] | None = None) -> dict[str, int]:
    """The dtypes this converted folder can serve ({dtype: bytes of its files}); GraphkitError naming the
    problem when it is not a Transformers.js folder, or a dtype's file (or external data chunk) is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraphkitError(f"{folder}: no such folder; give a folder written by `graphkit convert`")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise GraphkitError(f"{folder}: not a converted model folder ({name} is missing); "
                                f"make one with `graphkit convert -o {folder}`")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphkitError(f"{folder / 'config.json'}: not valid JSON ({exc}); fix or re-convert the folder") from None
    external = (config.get(TJS_CONFIG) or {}).get(USE_EXTERNAL_DATA) or {}
    found: dict[str, int] = {}
    for dtype, fname in DTYPE_FILES.items():
        f = folder / "onnx" / fname
        if not f.is_file():
            continue
        chunks = external.get(fname, 0) if isinstance(external, dict) else 0
        files = [f] + [folder / "onnx" / external_data_name(fname, i) for i in range(int(chunks or 0))]
        for part in files[1:]:
            if not part.is_file():
                raise GraphkitError(f"{part}: missing; config.json says {fname} has {chunks} external data file(s); "
                                    "copy the whole folder or re-convert it")
        found[dtype] = sum(p.stat().st_size for p in files)
    # graphkit's 4-bit download for wasm (docs/w4.md): the graph, its .w4bin and the w4.mjs that expands it
    w4 = [folder / "onnx" / OUTPUT_FILES["w4"], folder / "onnx" / Path(OUTPUT_FILES["w4"]).with_suffix(".w4bin").name,
          folder / "w4.mjs"]
    if w4[0].is_file():
        for part in w4[1:]:
            if not part.is_file():
                raise GraphkitError(f"{part}: missing; {w4[0].name} needs it (docs/w4.md); copy the whole folder or "
                                    "re-convert it with --dtypes ...,w4")
        found["w4"] = sum(p.stat().st_size for p in w4[:2])
    if not found:
        raise GraphkitError(f"{folder}: not a converted model folder (no onnx/model*.onnx); "
                            f"make one with `graphkit convert -o {folder}`")
    if dtypes:
        missing = [d for d in dtypes if d not in found]
        if missing:
            raise GraphkitError(f"{folder}: no file for dtype {', '.join(missing)} "
                                f"(onnx/{OUTPUT_FILES.get(missing[0], '?')}); this folder has {', '.join(found)}")
        found = {d: found[d] for d in dtypes}
    return found


def find_client(node_modules: Path | None = None) -> tuple[Path, Path, str, str]:
    """(transformers dist, onnxruntime-web dist, their versions) from an npm install of @huggingface/transformers."""
    nm = Path(node_modules) if node_modules else DEFAULT_NODE_MODULES
    tjs = nm / "@huggingface" / "transformers"
    hint = ("run `bash scripts/setup.sh` in a graphkit checkout, or `npm install @huggingface/transformers` "
            "somewhere and pass --node-modules PATH/node_modules")
    if not (tjs / "dist" / "transformers.web.js").is_file():
        raise GraphkitError(f"{nm}: Transformers.js is not installed there; {hint}")
    for ort in (tjs / "node_modules" / "onnxruntime-web", nm / "onnxruntime-web"):
        if (ort / "dist" / "ort.webgpu.min.mjs").is_file():
            break
    else:
        raise GraphkitError(f"{nm}: onnxruntime-web (Transformers.js's runtime) is not installed; {hint}")

    def version(pkg: Path) -> str:
        return json.loads((pkg / "package.json").read_text(encoding="utf-8")).get("version", "?")
    return tjs / "dist", ort / "dist", version(tjs), version(ort)


def _targets(folder: Path) -> list[str]:
    from graphkit.usage import folder_targets
    return folder_targets(folder)


def safe_path(root: Path, rel: str) -> tuple[Path | None, int]:
    """Map an already-decoded URL path below a route onto a file in ``root``: (path, 200), or (None, 403/404)."""
    if "\\" in rel or "\0" in rel:
        return None, 403
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None, 403
    candidate = root.joinpath(*parts) if parts else root
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, 404
    root_real = root.resolve()
    if real != root_real and root_real not in real.parents:
        return None, 403  # a symlink (or mount trick) out of the served folder
    if not real.is_file():
        return None, 404
    return real, 200


class _Handler(SimpleHTTPRequestHandler):
    server_version = "graphkit-serve"
    sys_version = ""

    # set per server by make_server
    routes: list[tuple[str, Path]] = []
    static: dict[str, Path] = {}
    info: dict = {}
    log: Callable[[str], None] | None = None

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        if self.log:
            self.log(format % args)

    def _deny(self, status: int) -> None:
        body = HTTPStatus(status).phrase.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self) -> tuple[Path | bytes | None, int, str]:
        raw = urlsplit(self.path).path
        path = unquote(raw, errors="strict")
        if path == "/api/info.json":
            return json.dumps(self.info).encode(), 200, CONTENT_TYPES[".json"]
        if path in self.static:
            f = self.static[path]
            return f, 200, CONTENT_TYPES.get(f.suffix, "application/octet-stream")
        for prefix, root in self.routes:
            if path.startswith(prefix):
                f, status = safe_path(root, path[len(prefix):])
                return f, status, CONTENT_TYPES.get(f.suffix if f else "", "application/octet-stream")
        return None, 404, ""

    def _serve(self, head: bool) -> None:
        try:
            target, status, ctype = self._resolve()
        except UnicodeDecodeError:
            return self._deny(400)
        if target is None:
            return self._deny(status)
        if isinstance(target, bytes):
            data, size = target, len(target)
        else:
            data, size = None, target.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if head:
            return
        if data is not None:
            self.wfile.write(data)
            return
        with open(target, "rb") as fh:
            try:
                while chunk := fh.read(1 << 20):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._deny(405)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815


def make_server(folder: Path, host: str = "127.0.0.1", port: int = 8000, dtypes: list[str] | None = None,
                node_modules: Path | None = None, log: Callable[[str], None] | None = None) -> ThreadingHTTPServer:
    """Check the folder and the client, then bind (not yet serving). GraphkitError on bad input."""
    folder = Path(folder).resolve()
    found = check_folder(folder, dtypes)
    tjs_dist, ort_dist, tjs_version, ort_version = find_client(node_modules)
    model_id = folder.name if _MODEL_ID.fullmatch(folder.name) else "model"
    files = {p.name: p for p in PAGE_DIR.iterdir() if p.is_file()}
    info = {"model_id": model_id, "model_path": f"/models/{model_id}/", "folder": str(folder),
            "dtypes": [{"dtype": d, "file": f"onnx/{OUTPUT_FILES[d]}", "bytes": n} for d, n in found.items()],
            "targets": _targets(folder), "transformers_version": tjs_version, "onnxruntime_web_version": ort_version}
    handler = type("GraphkitServeHandler", (_Handler,), {
        "routes": [(f"/models/{model_id}/", folder), ("/tjs/", tjs_dist), ("/ort/", ort_dist), ("/app/", PAGE_DIR)],
        "static": {"/": files["index.html"], "/index.html": files["index.html"]},
        "info": info, "log": staticmethod(log) if log else None,
    })
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise GraphkitError(f"port {port} on {host} is in use; pass --port with a free port (or 0 for any)") from None
        raise GraphkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --host or --port") from None
    server.daemon_threads = True
    server.info = info  # type: ignore[attr-defined]
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in str(host) else host)
    return f"http://{shown}:{port}/"

