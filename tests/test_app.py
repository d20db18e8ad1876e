"""The web demo: the HTTP API in-process, then the page end to end in headless Chromium against a live server."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the web demo needs the app extra: pip install -e '.[app]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx: pip install -e '.[dev]'")
from _specs import named_spec  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from seg.data import read_rgb  # noqa: E402
from seg.model.segmentor import Segmentor  # noqa: E402
from seg.serve.app import create_app, main, serve_in_background  # noqa: E402
from seg.serve.predictor import Predictor  # noqa: E402

NAMES = ["sky", "grass", "road", "tree", "water"]
PHOTO_SIZE = (90, 150)  # (H, W)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def photo(path: Path) -> Path:
    """A smooth colourful picture (different colours in different places, so the model sees structure)."""
    h, w = PHOTO_SIZE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * xs / w, 255 * ys / h, 128 + 127 * np.sin(xs / 9) * np.cos(ys / 7)], axis=-1)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model saved with save_pretrained: the test checks the plumbing, not the segmentation."""
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt_v2", "semantic_fpn", num_classes=len(NAMES), decoder_channels=16,
                      aux_head=False)
    with torch.no_grad():  # spread the classifier's output so several classes show up
        model.decode_head.conv_seg.weight.mul_(50)
    predictor = Predictor(model, named_spec(NAMES, (128, 64)))
    return predictor.save_pretrained(tmp_path_factory.mktemp("pretrained") / "tiny")


@pytest.fixture(scope="module")
def bundle(pretrained_dir: Path) -> Predictor:
    return Predictor.from_pretrained(pretrained_dir)


@pytest.fixture(scope="module")
def client(bundle: Predictor) -> TestClient:
    return TestClient(create_app(bundle, max_upload_bytes=200_000), base_url="http://127.0.0.1")


def decode(data_url: str, kind: str) -> Image.Image:
    prefix = f"data:image/{kind};base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))


def test_page_and_info(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and 'id="legend"' in page.text
    info = client.get("/api/info").json()
    assert info["model"] == "test_flatten_pvt_v2 + semantic_fpn"
    assert [c["name"] for c in info["classes"]] == NAMES and info["test_scale"] == [128, 64]


def test_segment_returns_the_prediction_files(client: TestClient, bundle: Predictor, tmp_path: Path) -> None:
    path = photo(tmp_path / "street view.jpg")
    response = client.post("/api/segment", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    h, w = PHOTO_SIZE
    assert (body["height"], body["width"]) == (h, w)
    assert decode(body["overlay"], "jpeg").size == (w, h)
    assert decode(body["overlay_legend"], "jpeg").size[1] > h  # the writer's overlay: legend band below
    labels = np.asarray(decode(body["labels"], "png"))
    expected = bundle.predict(read_rgb(path))  # the same prediction path as cli.py predict
    np.testing.assert_array_equal(labels, expected + 1)  # class k stored as k + 1
    assert (body["labels_file"], body["overlay_file"]) == ("street view_labels.png", "street view_overlay.jpg")
    present = [item["name"] for item in body["legend"]]
    assert present and set(present) <= set(NAMES)
    assert sum(item["share"] for item in body["legend"]) == pytest.approx(1.0, abs=1e-3)
    assert body["legend"][0]["id"] == int(np.bincount(expected.ravel()).argmax())  # largest area first


def test_bad_uploads_get_a_4xx_message(client: TestClient, tmp_path: Path) -> None:
    response = client.post("/api/segment", files={"image": ("notes.txt", b"not a picture", "text/plain")})
    assert response.status_code == 415
    assert response.json()["detail"].startswith("notes.txt is not an image that can be read")
    response = client.post("/api/segment", files={"image": ("empty.jpg", b"", "image/jpeg")})
    assert response.status_code == 400 and "empty" in response.json()["detail"]
    response = client.post("/api/segment", files={"image": ("big.png", b"0" * 200_001, "image/png")})
    assert response.status_code == 413
    assert client.post("/api/segment").status_code == 422  # no file field at all


def test_main_needs_one_model_source(pretrained_dir: Path) -> None:
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["--pretrained", str(pretrained_dir), "--ckpt_path", "x.ckpt"])


@pytest.fixture
def server(bundle: Predictor) -> Iterator[str]:
    """The demo served by uvicorn on a free localhost port."""
    with serve_in_background(create_app(bundle)) as url:
        yield url


# pixel statistics of the displayed overlay, read back through a canvas
_IMAGE_STATS = """img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let min = 255, max = 0;
  for (let i = 0; i < data.length; i += 4) { for (let c = 0; c < 3; c++) {
    min = Math.min(min, data[i + c]); max = Math.max(max, data[i + c]); } }
  return {width: img.naturalWidth, height: img.naturalHeight, min, max};
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_page_in_headless_chromium(server: str, bundle: Predictor, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")
    path = photo(tmp_path / "photo.jpg")
    expected = bundle.predict(read_rgb(path))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640}, accept_downloads=True)
            page.goto(server)
            sync_api.expect(page.locator("#model")).to_contain_text("test_flatten_pvt_v2")
            page.set_input_files("#file", str(path))
            overlay = page.locator("#overlay")
            sync_api.expect(overlay).to_be_visible(timeout=30_000)
            page.wait_for_function("document.getElementById('overlay').complete")
            stats = overlay.evaluate(_IMAGE_STATS)
            h, w = PHOTO_SIZE
            assert (stats["height"], stats["width"]) == (h, w)
            assert stats["max"] - stats["min"] > 50  # a picture, not a blank
            legend = page.locator("#legend li .name").all_inner_texts()
            assert legend and set(legend) <= set(NAMES)
            assert legend[0] == NAMES[int(np.bincount(expected.ravel()).argmax())]
            sync_api.expect(page.locator("#download-labels")).to_have_attribute("download", "photo_labels.png")
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            with page.expect_download() as download:
                page.click("#download-labels")
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            np.testing.assert_array_equal(np.asarray(Image.open(saved)), expected + 1)

            notes = tmp_path / "notes.txt"
            notes.write_text("not a picture")
            page.set_input_files("#file", str(notes))
            sync_api.expect(page.locator("#error")).to_contain_text("Error 415: notes.txt is not an image")
            sync_api.expect(overlay).to_be_hidden()
            page.screenshot(path=tmp_path / "error.png")
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("encoder", "decoder"),
    [("test_soft", "semantic_fpn"), ("test_flatten_swin", "upernet"), ("test_agent_pvt", "semantic_fpn"),
     ("test_agent_swin", "upernet"), ("test_mlla", "upernet"), ("test_ravlt", "semantic_fpn"),
     ("test_mala", "semantic_fpn"), ("test_pola_pvt", "semantic_fpn"), ("test_pola_swin", "upernet")],
)
def test_every_attention_family_serves(encoder: str, decoder: str, tmp_path: Path) -> None:
    """Each encoder family goes through the demo: saved, loaded from its folder, a photo of a size that is no
    multiple of the encoder's stride segmented through the API exactly as the predictor segments it."""
    torch.manual_seed(0)
    model = Segmentor(encoder, decoder, num_classes=len(NAMES), decoder_channels=16, aux_head=False)
    folder = Predictor(model, named_spec(NAMES, (128, 64))).save_pretrained(tmp_path / encoder)
    loaded = Predictor.from_pretrained(folder)
    client = TestClient(create_app(loaded), base_url="http://127.0.0.1")
    assert client.get("/api/info").json()["model"] == f"{encoder} + {decoder}"
    path = photo(tmp_path / "photo.jpg")
    response = client.post("/api/segment", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    labels = np.asarray(decode(response.json()["labels"], "png"))
    assert labels.shape == PHOTO_SIZE
    np.testing.assert_array_equal(labels, loaded.predict(read_rgb(path)) + 1)
