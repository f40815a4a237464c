"""serve.py: `smolcluster serve-model`'s page and /predict, served for real on a loopback port."""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from smolcluster.cli import main
from smolcluster.config import ModelConfig
from smolcluster.models import DataShape, build_model
from smolcluster.predict import image_input, top
from smolcluster.results import save_model
from smolcluster.serve import MAX_BODY, make_server

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_model(build_model(ModelConfig(hidden=16), 0), ModelConfig(hidden=16), path)
    return path


@pytest.fixture(scope="module")
def served(model_path):
    httpd = make_server(model_path, "127.0.0.1", 0, 3)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _png(value: int = 0) -> bytes:
    img = Image.new("L", (280, 280), value)
    img.paste(255 - value, (100, 40, 180, 240))  # a thick bar: a one, more or less
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _http(port: int, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _raw(port: int, data: bytes, close_write: bool = False) -> bytes:
    """Send bytes as they are; the whole answer, up to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def test_the_page_is_one_file_with_a_canvas_and_no_cdn(served):
    code, body = _http(served, "/")
    assert code == 200 and b"<canvas" in body and b'type="file"' in body and b"toBlob" in body
    assert b"<script src" not in body and b"https://" not in body and b"http://" not in body


def test_a_png_gets_the_models_top_classes(served, model_path, tmp_path):
    png = _png()
    code, body = _http(served, "/predict", png)
    assert code == 200, body
    ranked = json.loads(body)["top"]
    assert len(ranked) == 3 and [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    (tmp_path / "x.png").write_bytes(png)
    from smolcluster.results import load_model

    model = load_model(model_path)[0]
    want = top(model, image_input(tmp_path / "x.png", (1, 28, 28)), 3)  # what `smolcluster predict` says
    assert [c for c, _ in ranked] == [c for c, _ in want]
    assert [p for _, p in ranked] == pytest.approx([p for _, p in want], abs=1e-5)
    # dark ink on white paper reads as the same digit
    assert json.loads(_http(served, "/predict", _png(255))[1])["top"][0][0] == ranked[0][0]


@pytest.mark.parametrize("body", [b"garbage, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, _png()[:100]])
def test_what_is_not_an_image_is_a_400_with_the_reason_in_one_line(served, body):
    code, answer = _http(served, "/predict", body)
    assert code == 400 and b"not an image Pillow can read" in answer and answer.count(b"\n") == 1, answer
    assert _http(served, "/healthz") == (200, b"ok\n")


def test_an_oversized_body_is_refused_unread(served):
    answer = _raw(served, f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 413") and str(MAX_BODY).encode() in answer, answer[:300]


@pytest.mark.parametrize("head, code", [
    (b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"411"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b", b"400"),  # then EOF
])
def test_a_missing_bad_or_broken_length_is_refused(served, head, code):
    answer = _raw(served, head, close_write=True)
    assert answer.split(b" ", 2)[1] == code, answer[:300]
    assert _http(served, "/healthz")[0] == 200


@pytest.mark.parametrize("method, path, code", [
    ("PUT", "/predict", 405), ("DELETE", "/predict", 405), ("PATCH", "/", 405), ("GET", "/predict", 405),
    ("POST", "/elsewhere", 404), ("GET", "/etc/passwd", 404),
])
def test_wrong_methods_and_paths(served, method, path, code):
    got, body = _http(served, path, b"x" if method in ("POST", "PUT", "PATCH") else None, method)
    assert got == code, body


def test_a_text_model_or_a_taken_port_is_one_error_line(tmp_path, served):
    from smolcluster.models import PRESETS

    gpt = ModelConfig(**{**PRESETS["GPT"], "n_layer": 1, "n_embd": 16, "n_head": 2})
    text = DataShape("lm", 3, (8,), "abc")
    save_model(build_model(gpt, 0, text), gpt, tmp_path / "gpt.safetensors", meta=text)
    assert main(["serve-model", str(tmp_path / "gpt.safetensors"), "--port", "0"]) == 2
    save_model(build_model(ModelConfig(hidden=4), 0), ModelConfig(hidden=4), tmp_path / "m.safetensors")
    assert main(["serve-model", str(tmp_path / "m.safetensors"), "--port", str(served)]) == 1
