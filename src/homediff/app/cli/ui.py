"""``homediff ui``: serve the generation page (Gradio; ``pip install 'homediff[ui]'``)."""

from __future__ import annotations

from homediff.app.cli.model_options import add_model_arguments


def register(commands) -> None:
    ui = commands.add_parser(
        "ui", help="serve a web page to generate images, with camera control",
        description="Serve a Gradio page for a model at http://HOST:PORT (this machine only unless "
                    "--host says otherwise). Requests queue one at a time.")
    add_model_arguments(ui, lora_help="load a LoRA adapter (its scale is a slider on the page); repeatable")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixels per image (1024²)")
    ui.add_argument("--max-steps", type=int, default=100, help="sampling steps per request (100)")
    ui.add_argument("--max-images", type=int, default=8, help="images per request (8)")
    ui.set_defaults(run=run, background=False)


def run(args) -> int:
    serve_args(args)
    return 0


def serve_args(args):
    """Serve the page as the command line asks; returns the app (running, with ``args.background``)."""
    from homediff.app.cli.generate import load_pipeline
    from homediff.app.ui import LOADING, Limits, serve

    return serve(lambda: load_pipeline(args), {name: getattr(args, name) for name in LOADING},
                 Limits(args.max_pixels, args.max_steps, args.max_images), args.host, args.port,
                 args.background)
