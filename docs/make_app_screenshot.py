"""Regenerate the README's screenshot of the web demo: serve a pretrained folder, upload a photo in headless
Chromium, save the page.

    python docs/make_app_screenshot.py --pretrained pretrained/demo \
        --image data/demo/images/validation/demo_val_00003.jpg

Needs the dev extra (playwright) and the system's Chromium (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

from seg.serve.app import create_app, serve_in_background
from seg.serve.predictor import Predictor

DOCS = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="a saved model: folder or Hub id")
    parser.add_argument("--image", required=True, help="photo to upload")
    parser.add_argument("--out", default=str(DOCS / "app.jpg"))
    parser.add_argument("--width", type=int, default=960, help="browser window width in CSS pixels")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium is not installed (Debian: apt-get install -y chromium)")
    predictor = Predictor.from_pretrained(args.pretrained)
    with serve_in_background(create_app(predictor)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": args.width, "height": 600})
        page.goto(url)
        page.set_input_files("#file", args.image)
        expect(page.locator("#overlay")).to_be_visible(timeout=120_000)
        page.wait_for_function("document.getElementById('overlay').complete")
        png = Path(args.out).with_suffix(".png")
        page.screenshot(path=png, full_page=True)
        browser.close()
    if Path(args.out).suffix.lower() in (".jpg", ".jpeg"):
        Image.open(png).convert("RGB").save(args.out, quality=85, optimize=True)
        png.unlink()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
