"""`smolcluster serve-model MODEL`: a page to draw a digit on (or upload a picture of one) that
shows, as each stroke ends, what a saved classifier makes of it.

GET / is the page (predict.html: one file, no CDN, made for a phone too); POST /predict takes
the image's bytes (PNG, JPEG, ...: whatever Pillow reads) and answers {"top": [[class, p], ...]}.
A body must say its length, and one over MAX_BODY bytes is refused before a byte of it is read;
what is not an image is a 400 with the reason in one line. Nothing a client sends ends the
server: the worst is a 500 with one line, logged.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import torch
from loguru import logger

from smolcluster.errors import DataFileError
from smolcluster.predict import image_input, load_classifier, require_grey_images, top
from smolcluster.web import Handler, listen, page

MAX_BODY = 4 << 20
"""Bytes an upload may have: a phone's photo fits, a flood does not."""


class Predictor:
    """The model behind a lock: request threads take turns (one small forward pass each)."""

    def __init__(self, model: torch.nn.Module, shape: tuple[int, ...], k: int) -> None:
        self.model, self.shape, self.k = model, shape, k
        self._lock = threading.Lock()

    def __call__(self, image: bytes) -> list[tuple[int, float]]:
        x = image_input(image, self.shape, "the upload")
        with self._lock:
            return top(self.model, x, self.k)


class _Handler(Handler):
    predictor: Predictor
    allowed = "GET, HEAD, POST"

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, page("predict.html"), "text/html; charset=utf-8")
        if path == "/healthz":
            return self._text(200, "ok")
        if path == "/predict":
            return self._refuse("POST an image's bytes to /predict")
        self._text(404, "not found")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/predict":
            return self._text(404, "not found")
        body = self._body()
        if body is None:
            return
        try:
            ranked = self.predictor(body)
        except DataFileError as e:
            return self._text(400, str(e))
        except Exception as e:  # noqa: BLE001 (a bug must cost one request, not the server)
            logger.error(f"predict: {type(e).__name__}: {str(e)[:200]}")
            return self._text(500, f"the model failed on this image ({type(e).__name__})")
        logger.debug(f"predict: {ranked[0][0]} ({100 * ranked[0][1]:.1f}%) from {len(body)} bytes")
        self._send(200, json.dumps({"top": [[c, round(p, 6)] for c, p in ranked]}).encode(), "application/json")

    def _body(self) -> bytes | None:
        """The request's body, or None once it was refused: no length 411, a bad one 400, too long
        413 (unread), one that ends early 400."""
        self.close_connection = True
        text = self.headers.get("Content-Length")
        if text is None:
            self._text(411, f"say the body's length (Content-Length, at most {MAX_BODY} bytes)")
            return None
        if not text.strip().isdigit():
            self._text(400, f"Content-Length: expected a number of bytes, got {text[:40]!r}")
            return None
        length = int(text)
        if length > MAX_BODY:
            self._text(413, f"{length} bytes: at most {MAX_BODY} ({MAX_BODY >> 20} MiB)")
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self._text(400, f"the body ended after {len(body)} of {length} bytes")
            return None
        return body


def make_server(path: Path, bind: str, port: int, k: int) -> ThreadingHTTPServer:
    """The page and /predict for the classifier in `path`, bound (port 0: a free one), not yet serving."""
    model, shape, _ = load_classifier(path)
    require_grey_images(shape, str(path))
    handler = type("PredictHandler", (_Handler,), {"predictor": Predictor(model, shape, k)})
    try:
        return listen(handler, bind, port)
    except OSError as e:  # one line, exit 1 (cli.main)
        raise OSError(f"serve-model: cannot listen on {bind}:{port} ({e.strerror or e}); try --port 0") from None


def serve_model(path: Path, bind: str, port: int, k: int) -> int:
    """Serve until Ctrl-C; the URL is printed."""
    httpd = make_server(path, bind, port, k)
    host, bound = httpd.server_address[:2]
    logger.info(f"serving {path}: its top {k} classes for each image POSTed to /predict")
    print(f"draw a digit at http://{host}:{bound}/ (Ctrl-C stops it)", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0
