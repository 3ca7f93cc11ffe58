"""The `disp` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _print(result: dict, as_json: bool, human: str) -> None:
    print(json.dumps(result, indent=2) if as_json else human)


@command("init-tiny")
def cmd_init_tiny(args: argparse.Namespace) -> int:
    from disp.models.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {out}")
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from disp import models
    from disp.config import SamplerConfig
    from disp.sampling import generate

    model = models.load(args.model, projector=args.projector, device=args.device)
    cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length or args.gen_length,
                        steps=args.steps or args.gen_length, temperature=args.temperature,
                        remasking=args.remasking)
    image = Image.open(args.image).convert("RGB")
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    out = generate(model, model.prompt_batch([args.prompt], [image]), cfg, generator=gen)
    answer = model.tokenizer.decode(out.answers()[0]).strip()
    _print({"answer": answer, "tokens": out.answers()[0], "steps": out.steps_run}, args.json, answer)
    return 0


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=32, help="answer length in tokens")
    p.add_argument("--block-length", type=int, default=None, help="block length (default: gen-length)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel temperature; 0 = deterministic")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a tiny random-weight checkpoint in the published layout")
    p.add_argument("--family", default="llada-v", choices=["llada-v"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="answer a prompt about an image")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--projector", type=Path, default=None, help="projector-only safetensors laid over --model")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_sampler_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"disp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
