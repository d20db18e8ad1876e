"""Web demo: upload a photo, see its colour overlay with the class legend, download the label PNG.

    python -m seg.app --pretrained pretrained/demo                  # a saved model: a folder or a Hub id
    python -m seg.app --config configs/demo.yaml --ckpt_path logs/demo/checkpoints/best.ckpt

serves http://127.0.0.1:8000 (``--host``, ``--port``). Needs the ``app`` extra (``pip install -e ".[app]"``:
FastAPI, uvicorn, python-multipart). A photo goes through the prediction path of ``cli.py predict`` (EXIF
orientation, keep-ratio rescale into the model's ``test_scale``, normalisation, the configured inference mode,
labels at the photo's size) and comes back as the files the prediction writer produces: the label PNG (class k
stored as k + 1) and the overlay with its legend, plus the bare overlay and the legend entries for the page.

Endpoints: ``GET /`` the page (``seg/static/index.html``), ``GET /api/info`` the model and its classes,
``POST /api/segment`` (multipart field ``image``) the results as JSON with images as data URLs; a file that is
not an image gets 415, an empty one 400, one over the size limit 413, each with a ``detail`` message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
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
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image

from seg.data.ade20k import read_rgb
from seg.predictor import Predictor
from seg.pretrained import from_checkpoint
from seg.writers import JPEG_QUALITY, blend_labels, classes_by_area, label_image, make_overlay

__all__ = ["MAX_UPLOAD_BYTES", "create_app", "main", "segment_upload", "serve_in_background"]

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024


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


def segment_upload(predictor: Predictor, data: bytes, filename: str, alpha: float = 0.5) -> dict[str, Any]:
    """Segment one uploaded file.

    Returns:
        JSON-ready dict: ``name``, ``width``, ``height``, ``seconds``, ``overlay`` (JPEG data URL, the photo's
        size), ``overlay_legend`` (JPEG, the writer's overlay with the legend band below), ``labels`` (PNG, class
        k stored as k + 1), their download names ``overlay_file`` / ``labels_file``, and ``legend``: the classes
        present, largest area first, as ``{id, name, color, share}``.

    Raises:
        HTTPException: 400 for an empty upload, 415 for a file that does not decode as an image.
    """
    if not data:
        raise HTTPException(status_code=400, detail="the upload is empty: choose a photo (JPEG, PNG, WebP, BMP)")
    try:
        image = read_rgb(_Upload(data, filename or "the upload"), exif_transpose=True)
    except ValueError as err:
        reason = err.__cause__ or err  # the decoder's own words, naming the upload
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


def create_app(predictor: Predictor, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The demo's FastAPI application around one loaded model."""
    app = FastAPI(title="FLatten segmentation demo", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one prediction at a time: requests run in a thread pool
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
        with lock:
            return segment_upload(predictor, data, image.filename or "")

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
    """``python -m seg.app (--pretrained DIR | --config ... --ckpt_path FILE) [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m seg.app",
        description="Serve the segmentation demo page. Give a pretrained folder, or a run's config and checkpoint "
        "(any other argument, e.g. --config or --model..., is read as by `python cli.py`).",
    )
    parser.add_argument("--pretrained", help="a saved model (python -m seg.pretrained): a folder or a Hub id")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint of a run, with its --config")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda")
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
    uvicorn.run(create_app(predictor), host=args.host, port=args.port)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
