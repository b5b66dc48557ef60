"""``homediff ui`` driven in a real browser (headless Chromium through Playwright): a prompt and the
camera sliders, Generate, the gallery's image equal to the pipeline's for the same settings, the
command-line box reproducing it, and an over-limit request answered by a message in the page. The
tests without a browser (the command box, the limits, the address served) run everywhere."""

import argparse
import io
import json
import os
import shlex
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_components import tiny_pipeline_folder

from homediff.app.cli import main
from homediff.app.cli.ui import serve_args
from homediff.generation import GenerationRequest, sample
from homediff.pipeline import HomeDiffPipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def page(model_dir):
    """The page of a running app. The app runs beside its model folder and names it relatively, as
    a user would (``homediff ui --model model``), so the page shows no temporary path."""
    pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'homediff[ui]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright")
    here = os.getcwd()
    os.chdir(model_dir.parent)
    args = argparse.Namespace(model=Path("model"), host="127.0.0.1", port=free_port(), max_pixels=32 * 32,
                              max_steps=8, max_images=2, lora=[], device=None, dtype="float32",
                              text_encoder=None, vae=None, arch=None, background=True)
    app = serve_args(args)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"http://127.0.0.1:{args.port}/", wait_until="networkidle")
        yield page
        browser.close()
    app.close()
    os.chdir(here)


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def gallery_image(page) -> Image.Image:
    """The first image of the gallery, as the browser received it (a PNG with its settings)."""
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    response = page.request.get(image.get_attribute("src"))
    return Image.open(io.BytesIO(response.body()))


@needs_browser
def test_a_prompt_with_camera_control_gives_the_pipelines_image(page, model_dir, tmp_path):
    page.locator("#prompt textarea").fill("a red cat")
    set_number(page, "steps", 2)
    set_number(page, "seed", 7)
    set_number(page, "zoom", 1.5)
    set_number(page, "x-shift", 0.2)
    page.locator("#generate").click()
    received = gallery_image(page)
    assert json.loads(received.text["homediff"])["camera"] == {"zoom": 1.5, "x_shift": 0.2, "y_shift": 0.0}
    shown = received.convert("RGB")
    screenshot = os.environ.get("HOMEDIFF_UI_SCREENSHOT") or str(tmp_path / "ui.png")
    page.screenshot(path=screenshot, full_page=True)

    pipe = HomeDiffPipeline.from_pretrained(model_dir)
    request = GenerationRequest(["a red cat"], seed=7, steps=2, cfg=3.0, width=16, height=16,
                                zoom=1.5, x_shift=0.2, model=str(model_dir))
    expected = sample(pipe, request)[0][0]
    assert shown.size == expected.size and shown.tobytes() == expected.tobytes()

    command = page.locator("#command textarea").first.input_value()
    words = shlex.split(command)
    assert words[:2] == ["homediff", "generate"] and "--zoom" in words and "1.5" in words
    out = tmp_path / "cli.png"
    words[words.index("--out") + 1] = str(out)
    assert main([w if w != "model" else str(model_dir) for w in words[1:]]) == 0
    assert Image.open(out).convert("RGB").tobytes() == shown.tobytes()


@needs_browser
def test_an_over_limit_request_is_a_message_in_the_page(page):
    set_number(page, "width", 128)  # 128 × 16 pixels: over this app's limit of 32²
    page.locator("#generate").click()
    status = page.locator("#status")
    status.get_by_text("over the limit").wait_for(timeout=60_000)
    assert "Not generated" in status.inner_text()
    set_number(page, "width", 16)


def test_the_command_line_box_and_the_limits_without_a_browser(model_dir, caplog):
    from homediff.app.ui import Limits, Studio, preset_size

    pipe = HomeDiffPipeline.from_pretrained(model_dir)
    loading = dict(model=model_dir, lora=[], dtype="float32", device=None, text_encoder=None, vae=None,
                   arch=None)
    studio = Studio(pipe, loading, Limits(pixels=16 * 16, steps=4, images=1), Path("/nonexistent"))
    values = ["a cat", "", 9, 3.0, 1, 16, 16, 1, "euler", 0.0, 0.25, 1.0, 0.0, -0.5]
    assert studio.request(*values) == ([], "", "**Not generated:** steps must be 1 to 4 (homediff ui --max-steps)")
    values[2], values[5] = 2, 32
    assert "over the limit of 256 pixels" in studio.request(*values)[2]
    request = studio.request_of(dict(prompt="a cat", negative="blurry", steps=2, cfg=3.0, seed=1, width=16,
                                     height=16, num=1, sampler="heun", tread_gamma=(0.0, 0.25), zoom=1.0,
                                     x_shift=0.0, y_shift=-0.5), [])
    words = shlex.split(request.to_command(loading=studio.loading))
    assert words[words.index("--tread-gamma") + 1:words.index("--tread-gamma") + 3] == ["0", "0.25"]
    assert words[words.index("--y-shift") + 1] == "-0.5" and "--zoom" not in words
    assert words[words.index("--negative") + 1] == "blurry" and words[words.index("--sampler") + 1] == "heun"
    assert preset_size("16:9", 256, 16) == (336, 192) and preset_size("1:1", 32, 16) == (32, 32)


def test_the_page_serves_this_machine_only_unless_told(monkeypatch, caplog):
    from homediff.app import ui
    from homediff.app.cli import build_parser

    args = build_parser().parse_args(["ui", "--model", "m"])
    assert (args.host, args.port, args.max_steps) == ("127.0.0.1", 7860, 100)
    monkeypatch.setattr(ui, "build_app", lambda studio: pytest.fail("not reached"))
    monkeypatch.setattr("homediff.app.cli.generate.load_pipeline", lambda args: (_ for _ in ()).throw(
        RuntimeError("stop before loading")))
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stop before loading"):
        serve_args(build_parser().parse_args(["ui", "--model", "m", "--host", "0.0.0.0"]))
    assert "anyone who can reach this address can use the model" in caplog.text


@pytest.mark.parametrize("dtype, speedup, expected", [
    ("bfloat16", 0.05, torch.bfloat16), ("auto", 0.05, torch.float32), ("auto", 4.0, torch.bfloat16)])
def test_dtype_is_the_transformers_precision_and_in_the_command(model_dir, monkeypatch, dtype, speedup,
                                                                 expected):
    """``homediff ui --dtype``: the page's pipeline runs its transformer in that dtype ("auto" by the
    measurement, injected: bfloat16 emulated or native), and its command line repeats the flag."""
    from homediff.app import ui
    from homediff.app.cli import build_parser
    from homediff.precision import measured_with

    studios = []

    class Page:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            return None
    monkeypatch.setattr(ui, "build_app", lambda studio: studios.append(studio) or Page())
    with measured_with(lambda shape, device: speedup):
        serve_args(build_parser().parse_args(["ui", "--model", str(model_dir), "--dtype", dtype]))
    [studio] = studios
    assert next(studio.pipe.transformer.parameters()).dtype == expected
    request = studio.request_of(dict(prompt="a cat", negative="", steps=2, cfg=3.0, seed=1, width=16,
                                     height=16, num=1, sampler="euler", tread_gamma=(0.0, 0.0), zoom=1.0,
                                     x_shift=0.0, y_shift=0.0), [])
    words = shlex.split(request.to_command(loading=studio.loading))
    assert words[words.index("--dtype") + 1] == dtype
