"""Web demo: upload a photo, see its colour overlay with the class legend, download the label PNG.

    python -m seg.serve.app --pretrained pretrained/demo                  # a saved model: a folder or a Hub id
    python -m seg.serve.app --config configs/demo.yaml --ckpt_path logs/demo/checkpoints/best.ckpt

serves http://127.0.0.1:8000 (``--host``, ``--port``). Needs the ``app`` extra (``pip install -e ".[app]"``:
FastAPI, uvicorn, python-multipart). A photo goes through the prediction path of ``cli.py predict`` (EXIF
orientation, keep-ratio rescale into the model's ``test_scale``, normalisation, the configured inference mode,
labels at the photo's size) and comes back as the files the prediction writer produces: the label PNG (class k
stored as k + 1) and the overlay with its legend, plus the bare overlay and the legend entries for the page.

Endpoints: ``GET /`` the page (``seg/serve/static/index.html``), ``GET /api/info`` the model and its classes,
``POST /api/segment`` (multipart field ``image``) the results as JSON with images as data URLs; a file that is
not an image gets 415, an empty one 400, one over the size or pixel limit (or PIL's decompression-bomb limit)
413, a request when every worker is busy 503, a foreign Host 421, a POST from another origin (scheme, host or
port) 403, a malformed Content-Length 400 and a body with neither a length nor chunked encoding 411, each with a
``detail`` message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from seg.data.ade20k import read_rgb
from seg.data.safety import DEFAULT_MAX_PIXELS, ImageTooLargeError, check_pixels
from seg.serve.app_guards import RequestGuard, is_loopback
from seg.serve.predictor import Predictor
from seg.serve.writers import JPEG_QUALITY, blend_labels, classes_by_area, label_image, make_overlay
from seg.train.pretrained import from_checkpoint

__all__ = ["MAX_UPLOAD_BYTES", "create_app", "main", "segment_upload", "serve_in_background"]

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and headers around the photo
BUSY_WAIT_S = 2.0  # how long a request waits for a free worker before it is told the server is busy


class _Upload(io.BytesIO):
    """Uploaded bytes that name themselves by the file name in decoder error messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return self.label

    __str__ = __repr__


def _data_url(picture: Image.Image, fmt: str) -> str:
    """A picture as a ``data:`` URL (PNG, or JPEG at the prediction writer's quality)."""
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _hex(colour: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour))


def _bomb(name: str, err: Image.DecompressionBombError) -> HTTPException:
    """413 for a photo PIL refuses to decode as a possible decompression bomb, with its pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too many pixels"
    return HTTPException(status_code=413, detail=f"{name} declares {size}, far above what this demo decodes (PIL "
                                                 f"refuses it as a possible decompression bomb): scale it down first")


def segment_upload(predictor: Predictor, data: bytes, filename: str, alpha: float = 0.5) -> dict[str, Any]:
    """Segment one uploaded file.

    Returns:
        JSON-ready dict: ``name``, ``width``, ``height``, ``seconds``, ``overlay`` (JPEG data URL, the photo's
        size), ``overlay_legend`` (JPEG, the writer's overlay with the legend band below), ``labels`` (PNG, class
        k stored as k + 1), their download names ``overlay_file`` / ``labels_file``, and ``legend``: the classes
        present, largest area first, as ``{id, name, color, share}``.

    Raises:
        HTTPException: 400 for an empty upload, 413 for a photo over the pixel limit (or one PIL refuses as a
            decompression bomb), 415 for a file that does not decode as an image.
    """
    if not data:
        raise HTTPException(status_code=400, detail="the upload is empty: choose a photo (JPEG, PNG, WebP, BMP)")
    name = filename or "the upload"
    try:
        with Image.open(_Upload(data, name)) as header:  # the size, before decoding
            check_pixels(header.height, header.width, predictor.max_pixels, what=name)
    except ImageTooLargeError as err:
        raise HTTPException(status_code=413, detail=str(err)) from err
    except Image.DecompressionBombError as err:
        raise _bomb(name, err) from err
    except Exception:  # not an image: read_rgb below names the problem
        pass
    try:
        image = read_rgb(_Upload(data, name), exif_transpose=True)
    except ValueError as err:
        reason = err.__cause__ or err  # the decoder's own words, naming the upload
        if isinstance(reason, Image.DecompressionBombError):
            raise _bomb(name, reason) from err
        raise HTTPException(status_code=415, detail=f"{filename or 'the upload'} is not an image that can be read "
                                                    f"(JPEG, PNG, WebP, BMP, ...): {reason}") from err
    start = time.perf_counter()
    labels = predictor.predict(image)  # (H, W) class indices at the photo's size
    seconds = time.perf_counter() - start
    names, palette = predictor.class_names, predictor.palette
    areas = np.bincount(labels.ravel(), minlength=len(names))
    stem = Path(filename).stem or "image"
    return {
        "name": filename,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "seconds": round(seconds, 3),
        "overlay": _data_url(Image.fromarray(blend_labels(image, labels, palette, alpha)), "JPEG"),
        "overlay_legend": _data_url(Image.fromarray(make_overlay(image, labels, names, palette, alpha)), "JPEG"),
        "labels": _data_url(label_image(labels, 1, filename), "PNG"),
        "overlay_file": f"{stem}_overlay.jpg",
        "labels_file": f"{stem}_labels.png",
        "legend": [
            {"id": c, "name": names[c], "color": _hex(palette[c]), "share": round(float(areas[c]) / labels.size, 4)}
            for c in classes_by_area(labels, len(names))
        ],
    }


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    workers: int = 1,
    busy_wait: float = BUSY_WAIT_S,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The demo's FastAPI application around one loaded model.

    Predictions run in the server's thread pool, off the event loop, at most ``workers`` at a time; a request
    that finds no free worker within ``busy_wait`` seconds gets 503 ("busy, try again") instead of queueing
    behind long photos. Photos above ``predictor.max_pixels`` get 413 from their header, bodies above
    ``max_upload_bytes`` get 413 while they stream in, requests for a Host other than the loopback names and
    ``allowed_hosts`` get 421, POSTs whose Origin differs from the page's in scheme, host or port 403, bodies with
    a malformed Content-Length 400 or without any framing 411 (:class:`~seg.serve.app_guards.RequestGuard`); any other
    failure is a JSON ``detail`` message the page shows, never a bare 500.
    """
    app = FastAPI(title="FLatten segmentation demo", docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, max_body_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES,
                       allowed_hosts=allowed_hosts)
    slots = threading.BoundedSemaphore(workers)  # predictions running at once
    config = predictor.model.config
    info = {
        "model": f"{config['encoder']} + {config['decoder']}",
        "num_classes": len(predictor.class_names),
        "test_scale": list(predictor.test_scale),
        "inference": predictor.inference.mode,
        "max_upload_bytes": max_upload_bytes,
        "classes": [{"id": i, "name": n, "color": _hex(predictor.palette[i])}
                    for i, n in enumerate(predictor.class_names)],
    }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def model_info() -> dict[str, Any]:
        return info

    @app.post("/api/segment")
    def segment(image: Annotated[UploadFile, File(description="a photo")]) -> dict[str, Any]:
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"{image.filename} is larger than "
                                                        f"{max_upload_bytes // 2**20} MiB")
        if not slots.acquire(timeout=busy_wait):
            raise HTTPException(status_code=503, detail="the server is busy with other photos: try again in a "
                                                        "moment")
        try:
            return segment_upload(predictor, data, image.filename or "")
        finally:
            slots.release()

    @app.exception_handler(Exception)
    async def failure(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"the prediction failed: {type(err).__name__}: {err}"})

    return app


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn from a background thread (port 0: a free port); yields the page's URL and stops
    the server on exit. For tests and scripts that drive the page with a browser."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the demo server did not start on {host}:{sock.getsockname()[1]}")
            time.sleep(0.05)
        yield f"http://{host}:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m seg.serve.app (--pretrained DIR | --config ... --ckpt_path FILE) [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m seg.serve.app",
        description="Serve the segmentation demo page. Give a pretrained folder, or a run's config and checkpoint "
        "(any other argument, e.g. --config or --model..., is read as by `python cli.py`).",
    )
    parser.add_argument("--pretrained", help="a saved model (python -m seg.train.pretrained): a folder or a Hub id")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint of a run, with its --config")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger photos (413)")
    parser.add_argument("--workers", type=int, default=1, help="photos segmented at once; others wait "
                        f"{BUSY_WAIT_S:g} s, then get 'busy' (503)")
    args, cli_args = parser.parse_known_args(argv)
    if bool(args.pretrained) == bool(args.ckpt_path):
        parser.error("give either --pretrained DIR or --config <experiment>.yaml --ckpt_path FILE")
    if args.pretrained:
        if cli_args:
            parser.error(f"unrecognized arguments with --pretrained: {' '.join(cli_args)}")
        predictor = Predictor.from_pretrained(args.pretrained, map_location=args.device)
    else:
        if not cli_args:
            parser.error("--ckpt_path needs the run's config: --config configs/<experiment>.yaml")
        predictor = from_checkpoint(cli_args, args.ckpt_path)
        predictor.model.to(torch.device(args.device))

    config = predictor.model.config
    print(f"{config['encoder']} + {config['decoder']}: open http://{args.host}:{args.port}/ in a browser")
    hosts: list[str] = []
    if not is_loopback(args.host):
        hosts = ["*"] if args.host in ("0.0.0.0", "::") else [args.host]
        print(f"warning: listening on {args.host}, beyond this machine: anyone who can reach port {args.port} can "
              "upload photos and use this computer's CPU / GPU; the demo has no login", file=sys.stderr)
    predictor.max_pixels = args.max_pixels
    uvicorn.run(create_app(predictor, workers=args.workers, allowed_hosts=hosts), host=args.host, port=args.port)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
