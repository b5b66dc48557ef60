"""``homediff model``: inspect backbone presets and original HDM arch configs."""

from __future__ import annotations

import json
from pathlib import Path

from homediff.errors import ConfigError


def register(commands) -> None:
    model = commands.add_parser("model", help="inspect backbone presets and HDM arch configs")
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="parameters and FLOPs of a preset or an HDM arch JSON")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", default="xut-base", help="preset name (default xut-base)")
    source.add_argument("--hdm-config", type=Path, help="an original HDM arch JSON file")
    info.add_argument("--height", type=int, default=128, help="input height in latent pixels")
    info.add_argument("--width", type=int, default=128, help="input width in latent pixels")
    info.add_argument("--text-tokens", type=int, default=256)
    info.set_defaults(run=run_info)
    actions.add_parser("presets", help="list the presets").set_defaults(run=run_presets)


def _config(args):
    from homediff.models import XUTConfig

    if args.hdm_config is None:
        return XUTConfig.preset(args.preset)
    try:
        arch = json.loads(args.hdm_config.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{args.hdm_config}: cannot read the arch JSON ({err})") from err
    return XUTConfig.from_hdm_config(arch.get("config", arch))


def _parameters(config) -> int:
    import torch

    from homediff.models import XUT

    with torch.device("meta"):
        return XUT(config).num_parameters()


def run_info(args) -> int:
    from homediff.models.flops import forward_flops

    config = _config(args)
    print(json.dumps(config.to_dict(), indent=1))
    print(f"parameters: {_parameters(config):,}")
    for rate in sorted({0.0, config.tread_rate}):
        gflops = forward_flops(config, args.height, args.width, args.text_tokens, rate) / 1e9
        print(f"forward GFLOPs per sample at {args.height}x{args.width} latent, "
              f"{args.text_tokens} text tokens, routing {rate}: {gflops:,.1f}")
    return 0


def run_presets(args) -> int:
    from homediff.models import PRESETS, XUTConfig

    for name in PRESETS:
        config = XUTConfig.preset(name)
        print(f"{name:10s} {_parameters(config):>13,} parameters  dim {config.dim}  "
              f"ctx_dim {config.ctx_dim}")
    return 0
