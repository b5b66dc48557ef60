"""README's picture of the web page: ``homediff ui`` on a trained model, one prompt generated.

    python docs/ui_screenshot.py runs/demo/model docs/ui.png

Serves the model on a free local port, opens the page in headless Chromium (Debian's ``chromium``
through Playwright), fills a prompt, draws four images and saves a screenshot of the whole page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from pathlib import Path

from playwright.sync_api import sync_playwright

from homediff.app.ui import serve

PROMPT = "red apple"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a pipeline folder, e.g. runs/demo/model")
    parser.add_argument("out", type=Path, help="the PNG to write, e.g. docs/ui.png")
    options = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    out = options.out.resolve()
    os.chdir(options.model.resolve().parent)  # the page names the model as a user would: "model"
    args = argparse.Namespace(model=Path(options.model.name), host="127.0.0.1", port=free_port(),
                              max_pixels=1024 * 1024, max_steps=100, max_images=8, lora=[], device=None,
                              dtype="auto", text_encoder=None, vae=None, arch=None, background=True)
    app = serve(args)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{args.port}/", wait_until="networkidle")
            page.locator("#prompt textarea").fill(PROMPT)
            set_number(page, "seed", 0)
            set_number(page, "num", 4)
            page.locator("#generate").click()
            page.locator("#gallery img").nth(3).wait_for(state="visible", timeout=300_000)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
