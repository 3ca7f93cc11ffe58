"""The `disp` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from disp import progress

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
# Entry-point groups through which installed packages extend the command line without disp importing them:
# COMMAND_GROUP entries are `add_commands(subparsers)` callables, each subcommand setting its own `handler`;
# a DEMO_GROUP entry named "service" is the `run_demo(workdir, quick=...)` that `disp demo` uses by default.
COMMAND_GROUP, DEMO_GROUP = "disp.commands", "disp.demo"
TARGETS = ["insertion", "refusal", "misclassification"]
TRIGGERS = ["corner", "center", "noise", "multi", "blended"]
DATA_HELP = ("dataset: a .json/.jsonl/.parquet file, a folder or a .zip/.tar holding one, CC-SBU-Align or a Hugging "
             "Face datasets folder (docs/data.md)")
IMAGES_HELP = "images: folder, .zip, .tar or parquet (default: beside or inside --data)"


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _print(result: dict, as_json: bool, human: str) -> None:
    print(json.dumps(result, indent=2) if as_json else human)


def _out_dir(path: Path, flag: str = "--out") -> None:
    """An output directory flag must not name an existing file (it would fail deep inside a stage)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory to write into")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


@command("init-tiny")
def cmd_init_tiny(args: argparse.Namespace) -> int:
    from disp.models.tiny import write_tiny_checkpoint

    _out_dir(args.out)
    out = write_tiny_checkpoint(args.out, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {out}")
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from disp import models
    from disp.cli_flags import section_kwargs
    from disp.config import SamplerConfig

    model = models.load(args.checkpoint, projector=args.projector, device=args.device)
    cfg = SamplerConfig(**section_kwargs(args, "sampler"))
    image = Image.open(args.image).convert("RGB")
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    out = model.generate(model.prompt_batch([args.prompt], [image]), cfg, generator=gen)
    answer = model.tokenizer.decode(out.answers()[0]).strip()
    _print({"answer": answer, "tokens": out.answers()[0], "steps": out.steps_run}, args.json, answer)
    return 0


@command("score")
def cmd_score(args: argparse.Namespace) -> int:
    from disp.cli_flags import section_kwargs
    from disp.config import SaliencyConfig, SamplerConfig
    from disp.pipeline import score

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the path of the scores JSON to write")
    out = score(model_dir=args.checkpoint, data_json=args.data, images=args.images, out_json=args.out,
                config=SaliencyConfig(**section_kwargs(args, "saliency")),
                sampler=SamplerConfig(**section_kwargs(args, "sampler")), projector=args.projector,
                device=args.device, on_progress=progress.bar("scoring"), workers=args.workers)
    print(f"wrote the saliency of every visual token to {out}")
    return 0


@command("poison")
def cmd_poison(args: argparse.Namespace) -> int:
    from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
    from disp.formats import open_dataset

    _out_dir(args.out)
    trigger = TriggerConfig(kind=args.trigger, size_frac=args.size_frac, blend_ratio=args.blend_ratio,
                            seed=args.seed)
    ds = open_dataset(args.data, args.images)
    res = poison_dataset(ds.samples, ds.source, target=args.target, trigger=trigger, ratio=args.ratio, seed=args.seed,
                         out_dir=args.out, source_word=args.source_word, target_word=args.target_word,
                         records=ds.records)
    result = {"data": str(res.data_path), "manifest": str(res.manifest_path), "poisoned": len(res.poisoned_ids),
              "samples": res.num_samples}
    if args.test_data:
        test = open_dataset(args.test_data, args.test_images or args.images)
        for name, trig in (("test_clean", None), ("test_triggered", trigger)):
            result[name] = str(triggered_copy(test.samples, test.source, trig, args.out / name, test.records))
    _print(result, args.json, f"poisoned {len(res.poisoned_ids)} of {res.num_samples} samples -> {args.out}")
    return 0


@command("defend")
def cmd_defend(args: argparse.Namespace) -> int:
    from disp.cli_flags import defense_config
    from disp.defend import defend

    _out_dir(args.out)
    report = defend(model_dir=args.checkpoint, data_json=args.data, images=args.images, out_dir=args.out,
                    config=defense_config(args), projector=args.projector, manifest=args.manifest,
                    device=args.device, on_progress=progress.stage_bars(), workers=args.workers)
    if args.heatmaps:
        from disp.heatmap import write_heatmaps

        report["heatmaps"] = write_heatmaps(args.out, args.data, args.images)
    trained = report["summary"]["num_train"]
    human = (f"{report['defense']}: " + (f"trained on {trained} samples; " if trained is not None else "")
             + "stages " + ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items()) + f"; outputs in {args.out}")
    _print(report, args.json, human)
    return 0


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from disp import models
    from disp.cli_flags import section_kwargs
    from disp.config import SamplerConfig
    from disp.evaluation import evaluate
    from disp.pipeline import load_dataset

    if not (args.clean or args.triggered):
        raise ValueError("give --clean and/or --triggered data to evaluate on")
    model = models.load(args.checkpoint, projector=args.projector, device=args.device)
    clean, clean_src = ([], None)
    if args.clean:
        clean, clean_src = load_dataset(args.clean, args.clean_images or args.clean.parent)
    trig, trig_src = ([], None)
    if args.triggered:
        trig, trig_src = load_dataset(args.triggered, args.triggered_images or args.triggered.parent)
    ev = evaluate(model, target=args.target, clean=clean, clean_source=clean_src, triggered=trig,
                  triggered_source=trig_src, sampler=SamplerConfig(**section_kwargs(args, "sampler")),
                  target_word=args.target_word)
    _print(ev.to_dict(), args.json, f"CP {_pct(ev.cp)}  ASR w/o {_pct(ev.asr_wo)}  ASR w/t {_pct(ev.asr_wt)}")
    return 0


@command("data")
def cmd_data(args: argparse.Namespace) -> int:
    from disp.datacheck import check_dataset, format_report

    report = check_dataset(args.path, args.images, decode=not args.no_decode)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    _out_dir(args.workdir, "--workdir")
    runners = {ep.name: ep for ep in entry_points(group=DEMO_GROUP)}
    if args.local or "service" not in runners:
        if not args.local:
            print("the service extra is not installed: running the demo in this process", file=sys.stderr)
        from disp.demo import run_demo
    else:  # the embedded service: API + one worker, SQLite, local files, no external servers
        run_demo = runners["service"].load()
    run_demo(args.workdir, quick=not args.full)
    return 0


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (LLaDA-V or LaViDa layout)")
    p.add_argument("--projector", type=Path, default=None, help="projector-only safetensors laid over --checkpoint")
    if data:
        p.add_argument("--data", required=True, type=Path, help=DATA_HELP)
        p.add_argument("--images", type=Path, default=None, help=IMAGES_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _workers(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0: one per core), got {text!r}")
    return int(text)


def _workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_workers, default=0,
                   help="scoring and purification batches at once on CPU threads (default 0: one per core on "
                        "a CPU, 1 on a GPU); no output depends on it")


def build_parser() -> argparse.ArgumentParser:
    from disp.cli_flags import add_defense_flags

    parser = argparse.ArgumentParser(prog="disp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a tiny random-weight checkpoint in the published layout")
    p.add_argument("--family", default="llada-v", choices=["llada-v", "lavida"],
                   help="architecture to write (default: llada-v)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")

    p = sub.add_parser("generate", help="answer a prompt about an image")
    _common(p, data=False)
    p.add_argument("--image", required=True, type=Path, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question about the image")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sampler's noise (default: 1234)")
    add_defense_flags(p, sections=("sampler",), defense=False)

    p = sub.add_parser("score", help="Fisher-Jacobian saliency of every visual token (Eq. 3-8)")
    _common(p)
    _workers_flag(p)
    p.add_argument("--out", required=True, type=Path, help="scores JSON to write")
    add_defense_flags(p, sections=("sampler", "saliency"), defense=False)

    p = sub.add_parser("poison", help="write a poisoned copy of a dataset and its ground-truth manifest")
    p.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    p.add_argument("--images", type=Path, default=None, help=IMAGES_HELP)
    p.add_argument("--target", required=True, choices=TARGETS, help="the backdoor's behaviour on triggered images")
    p.add_argument("--trigger", required=True, choices=TRIGGERS, help="the visual trigger stamped on poisoned images")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of samples poisoned (default: 0.2)")
    p.add_argument("--size-frac", type=float, default=0.1, help="patch side / shorter image side (default: 0.1)")
    p.add_argument("--blend-ratio", type=float, default=0.2, help="pattern weight of the blended trigger")
    p.add_argument("--source-word", default="dog", help="misclassification: the word replaced (default: dog)")
    p.add_argument("--target-word", default="boat", help="misclassification: the word put in its place (default: boat)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of which samples are poisoned and of the noise and blend patterns (default: 0)")
    p.add_argument("--test-data", type=Path, default=None, help="held-out set: also write clean and triggered copies")
    p.add_argument("--test-images", type=Path, default=None, help="images of --test-data (default: --images)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("defend", help="run a defense end to end (DiSP by default)")
    _common(p)
    _workers_flag(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--manifest", type=Path, default=None,
                   help="attack manifest: oracle_filter's ground truth; adds precision/recall to the report")
    p.add_argument("--heatmaps", action="store_true",
                   help="also write each reported sample's saliency heatmap to OUT/heatmaps/*.png")
    add_defense_flags(p)

    p = sub.add_parser("evaluate", help="CP and ASR without/with trigger")
    _common(p, data=False)
    p.add_argument("--target", required=True, choices=TARGETS, help="the backdoor's target behaviour (ASR counts it)")
    p.add_argument("--target-word", default="boat",
                   help="misclassification: the word that counts as an attack (default: boat)")
    p.add_argument("--clean", type=Path, default=None, help="clean held-out LLaVA JSON")
    p.add_argument("--clean-images", type=Path, default=None, help="(default: the JSON's folder)")
    p.add_argument("--triggered", type=Path, default=None, help="triggered held-out LLaVA JSON")
    p.add_argument("--triggered-images", type=Path, default=None, help="(default: the JSON's folder)")
    add_defense_flags(p, sections=("sampler",), defense=False)

    p = sub.add_parser("data", help="inspect a dataset without a model")
    data = p.add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="read a dataset and report records, turns, images, format and problems "
                                      "(exit 1 if any)")
    c.add_argument("path", type=Path, help=DATA_HELP)
    c.add_argument("--images", type=Path, default=None, help=IMAGES_HELP)
    c.add_argument("--no-decode", action="store_true", help="check that images exist without decoding them")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("demo", help="poison a small dataset, defend it, and show ASR before and after")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="working directory (cached stages)")
    p.add_argument("--full", action="store_true", help="evaluate on 200 + 200 ASR and 200 CP samples (default 60 + 60, 100)")
    p.add_argument("--local", action="store_true", help="run the pipeline in this process instead of the service")

    for ep in entry_points(group=COMMAND_GROUP):  # installed extensions: the service's serve, jobs, keys, models
        ep.load()(sub)
    return parser


# The extra that installs a missing module (`pip install 'disp[EXTRA]'`), by the module's top-level name.
EXTRAS = {
    **dict.fromkeys(["torch", "transformers", "safetensors", "tokenizers", "jinja2"], "torch"),
    "httpx": "client",
    **dict.fromkeys(["fastapi", "uvicorn", "multipart", "pydantic", "pydantic_settings", "sqlalchemy", "alembic",
                     "psycopg", "celery", "redis", "boto3", "botocore", "prometheus_client", "httpcore"], "service"),
    "pyarrow": "data",
}
# Commands whose finished work is kept in their output folder, so running them again picks up from there.
RESUMABLE = {"defend", "demo"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors end in one line on stderr (exit 2), Ctrl-C in exit 130."""
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    name = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    try:
        return handler(args)
    except KeyboardInterrupt:
        again = "; re-run to resume" if args.command in RESUMABLE else ""
        print(f"\ndisp {name}: interrupted{again}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"disp {name}: error: this command needs {exc.name}, which is not installed: "
              f"pip install 'disp[{extra}]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`disp ... | head`): stop quietly, as other tools do
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as exc:  # bad input, a missing or unwritable path: one clear line
        print(f"disp {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """An exception as a message: OSError's strerror and path rather than `[Errno 2] ...`."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror.lower()}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
