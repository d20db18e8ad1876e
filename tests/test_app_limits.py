"""The web demo under hostile or concurrent use, in-process on loopback: busy workers answer 503 at once, bodies
and photos over the limits get 413, foreign hosts and cross-origin posts are refused, failures are messages."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _specs import named_spec
from PIL import Image

pytest.importorskip("fastapi", reason="the web demo needs the app extra: pip install -e '.[app]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx: pip install -e '.[dev]'")
from fastapi.testclient import TestClient  # noqa: E402

import seg.serve.app  # noqa: E402
from seg.model.segmentor import Segmentor  # noqa: E402
from seg.serve.app import create_app, main  # noqa: E402
from seg.serve.predictor import Predictor  # noqa: E402

LOCAL = "http://127.0.0.1"


def png(h: int = 40, w: int = 60) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=3, decoder_channels=16, aux_head=False).eval()
    return Predictor(model, named_spec(["a", "b", "c"], (64, 32)))


class SlowPredictor(Predictor):
    """Takes ``delay`` seconds per photo (a large photo on a slow machine)."""

    delay = 0.0

    def predict(self, image: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return super().predict(image)


def test_second_user_is_told_busy_at_once(predictor: Predictor) -> None:
    slow = SlowPredictor(predictor.model, predictor.spec)
    slow.delay = 3.0
    client = TestClient(create_app(slow, workers=1, busy_wait=0.3), base_url=LOCAL)
    first: dict[str, int] = {}
    thread = threading.Thread(target=lambda: first.update(status=client.post(
        "/api/segment", files={"image": ("big.png", png(), "image/png")}).status_code))
    thread.start()
    time.sleep(0.5)  # the first photo is being segmented
    start = time.perf_counter()
    second = client.post("/api/segment", files={"image": ("small.png", png(), "image/png")})
    assert time.perf_counter() - start < 1.5
    assert second.status_code == 503 and "busy" in second.json()["detail"]
    thread.join()
    assert first["status"] == 200
    slow.delay = 0.0
    assert client.post("/api/segment", files={"image": ("again.png", png(), "image/png")}).status_code == 200


def test_pixel_bomb_is_refused_from_its_header(predictor: Predictor) -> None:
    buffer = io.BytesIO()
    Image.new("1", (9400, 9400)).save(buffer, "PNG", optimize=True)
    assert len(buffer.getvalue()) < 100_000  # a small file declaring 88 MP
    client = TestClient(create_app(predictor), base_url=LOCAL)
    start = time.perf_counter()
    reply = client.post("/api/segment", files={"image": ("bomb.png", buffer.getvalue(), "image/png")})
    assert time.perf_counter() - start < 2.0
    assert reply.status_code == 413
    assert reply.json()["detail"] == "bomb.png is 9400 x 9400 = 88.4 MP, above the limit of 40.0 MP (max_pixels); " \
                                     "scale it down first"


def test_body_limit_enforced_while_streaming(predictor: Predictor) -> None:
    """A chunked body without Content-Length: the guard stops reading after the limit, the app answers 413."""
    app = create_app(predictor, max_upload_bytes=100_000)
    pulled, sent = [], []

    async def receive() -> dict:
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' if not pulled else b""
        pulled.append(len(pulled))
        return {"type": "http.request", "body": head + b"x" * 65536, "more_body": len(pulled) < 100}  # 6.4 MiB

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/segment", "raw_path": b"/api/segment",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "http_version": "1.1", "asgi": {"version": "3.0"},
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"multipart/form-data; boundary=b"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"larger than" in sent[1]["body"]
    assert len(pulled) <= 3  # refused after 100 KiB + the form overhead, not after all 6.4 MiB
    client = TestClient(app, base_url=LOCAL)
    declared = client.post("/api/segment", content=b"x" * 200_000, headers={"content-type": "multipart/form-data"})
    assert declared.status_code == 413


def test_foreign_host_and_cross_origin_post_refused(predictor: Predictor) -> None:
    client = TestClient(create_app(predictor), base_url="http://127.0.0.1:8000")
    files = {"image": ("a.png", png(), "image/png")}
    assert client.post("/api/segment", files=files, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
    for origin in ("https://evil.example", "http://127.0.0.1:8001", "https://127.0.0.1:8000", "http://localhost:8000",
                   "http://127.0.0.1", "null", "http://127.0.0.1:80000"):  # another site, port, scheme or name
        reply = client.post("/api/segment", files=files, headers={"origin": origin})
        assert reply.status_code == 403 and "cross-origin" in reply.json()["detail"], origin
    default_port = TestClient(create_app(predictor), base_url=LOCAL)  # Host 127.0.0.1: port 80 on both sides
    assert default_port.post("/api/segment", files=files, headers={"origin": "http://127.0.0.1:80"}).status_code == 200
    rebound = TestClient(create_app(predictor), base_url="http://evil.example")
    assert rebound.get("/api/info").status_code == 421
    assert TestClient(create_app(predictor), base_url="http://localhost:8000").get("/api/info").status_code == 200


def _raw_post(app, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, str]:
    """Status and detail of a POST /api/segment sent straight to the ASGI app with exactly these headers."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/segment", "raw_path": b"/api/segment",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "http_version": "1.1", "asgi": {"version": "3.0"},
             "headers": [(b"host", b"127.0.0.1:8000"), *headers]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])["detail"]


@pytest.mark.parametrize("length", [b"abc", b"-5", b"12, 12", b"1e3", b"\xb2"])
def test_malformed_content_length_is_a_bad_request(predictor: Predictor, length: bytes) -> None:
    status, detail = _raw_post(create_app(predictor), [(b"content-length", length)], b"x" * 10)
    assert status == 400 and detail.startswith("malformed Content-Length header"), (status, detail)


def test_body_without_length_or_chunked_encoding_needs_a_length(predictor: Predictor) -> None:
    status, detail = _raw_post(create_app(predictor), [(b"content-type", b"multipart/form-data; boundary=b")], b"x")
    assert status == 411 and "Content-Length" in detail
    status, _ = _raw_post(create_app(predictor), [(b"content-length", b"1")], b"x")
    assert status == 422  # framed: the app itself answers (no form field)
    assert TestClient(create_app(predictor), base_url=LOCAL).get("/api/info").status_code == 200  # GET: no body


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height 1-bit pixels, with one empty data chunk: small, enough for PIL's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_too_large_with_its_pixel_count(predictor: Predictor) -> None:
    """20000 x 20000 is past PIL's own limit (it refuses to open it): 413 with the pixel count, not 415."""
    predictor.max_pixels, kept = None, predictor.max_pixels  # only PIL's limit applies
    try:
        client = TestClient(create_app(predictor), base_url=LOCAL)
        reply = client.post("/api/segment", files={"image": ("bomb.png", _png_header(20000, 20000), "image/png")})
    finally:
        predictor.max_pixels = kept
    assert reply.status_code == 413, reply.json()
    assert reply.json()["detail"].startswith("bomb.png declares 400.0 MP, far above what this demo decodes")


def test_failure_is_a_message_not_a_bare_500(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(seg.serve.app, "segment_upload", broken)
    client = TestClient(create_app(predictor), base_url=LOCAL, raise_server_exceptions=False)
    reply = client.post("/api/segment", files={"image": ("a.png", png(), "image/png")})
    assert reply.status_code == 500
    assert reply.json() == {"detail": "the prediction failed: RuntimeError: CUDA out of memory"}


def test_warning_when_listening_beyond_loopback(
    predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = predictor.save_pretrained(tmp_path / "tiny")
    served, apps = [], []
    monkeypatch.setattr(seg.serve.app.uvicorn, "run", lambda app, host, port: served.append(host) or apps.append(app))
    main(["--pretrained", str(folder)])
    assert "warning" not in capsys.readouterr().err
    main(["--pretrained", str(folder), "--host", "0.0.0.0", "--max_pixels", "1000"])
    assert "warning: listening on 0.0.0.0, beyond this machine" in capsys.readouterr().err
    assert served == ["127.0.0.1", "0.0.0.0"]
    reply = TestClient(apps[1], base_url="http://192.0.2.7:8000").post(  # any Host when bound to all addresses
        "/api/segment", files={"image": ("a.png", png(40, 60), "image/png")})
    assert reply.status_code == 413 and "above the limit of 0.0 MP" in reply.json()["detail"]
