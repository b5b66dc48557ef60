"""``homediff ui``: serve the generation page (Gradio; ``pip install 'homediff[ui]'``)."""

from __future__ import annotations



def register(commands) -> None:
    from homediff.app.cli.generate import lora_spec

    ui = commands.add_parser(
        "ui", help="serve a web page to generate images, with camera control",
        description="Serve a Gradio page for a model at http://HOST:PORT (this machine only unless "
                    "--host says otherwise). Requests queue one at a time.")
    ui.add_argument("--model", required=True,
                    help="a saved pipeline folder, a released HDM checkpoint file, or a hub id of either")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixels per image (1024²)")
    ui.add_argument("--max-steps", type=int, default=100, help="sampling steps per request (100)")
    ui.add_argument("--max-images", type=int, default=8, help="images per request (8)")
    ui.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                    help="load a LoRA adapter (its scale is a slider on the page); repeatable")
    ui.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    ui.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="the transformer's precision (default auto)")
    release = ui.add_argument_group("released HDM checkpoints (when --model is a file)")
    release.add_argument("--text-encoder", help="folder or hub id (default Qwen/Qwen3-0.6B)")
    release.add_argument("--vae", help="VAE folder or hub id (default KBlueLeaf/EQ-SDXL-VAE)")
    release.add_argument("--arch", help="the checkpoint's HDM arch JSON (default XUT-base)")
    ui.set_defaults(run=run, background=False)


def run(args) -> int:
    from homediff.app.ui import serve

    serve(args)
    return 0
