"""A backdoor cell on SHAPES: one target × trigger × poison ratio, with everything needed to defend and score it.

A cell is a poisoned SHAPES training set (its manifest says which samples were poisoned; defenses never read
it, except the oracle filter), the base's projector backdoored on it by projector-only fine-tuning (the
paper's attack recipe, scaled), and held-out sets: CP on samples of every task, ASR on "describe" samples
without and with the trigger. `disp demo` runs DiSP on the quick cell; the reproduction (experiments/) runs
every defense on many cells. Every stage is cached under the cell's folder and refused if it was built with
other settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.data import write_records
from disp.evaluation import evaluate
from disp.models import load, resolve_device
from disp.pipeline import finetune_samples, load_dataset
from disp.shapes import DESCRIBE_PROMPT, TASKS, Scene, ShapesConfig, generate_split, render_scene

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "shapes-base"  # the SHAPES base the wheel ships


@dataclass
class CellConfig:
    """How a cell is built, attacked, recovered and evaluated. The paper's values are noted; scaled ones say why."""

    train_tasks: tuple[str, ...] = field(default=("describe",), metadata={
        "help": "SHAPES tasks of the training set (paper: captions only, CC-SBU-Align; CP is measured on every "
                "task, as the paper measures it on MMMU)."})
    n_train: int = field(default=1000, metadata={"help": "Training samples (paper: 1000)."})
    n_asr: int = field(default=200, metadata={"help": "Held-out ASR samples, each clean and triggered (paper: 200)."})
    n_cp: int = field(default=200, metadata={"help": "Held-out clean-performance samples."})
    poison_ratio: float = field(default=0.2, metadata={"help": "Poisoned fraction (paper: 20%)."})
    patch_frac: float = field(default=1 / 6, metadata={
        "help": "Trigger patch side / image side (8 px on 48 px: one visual token; paper: 20 px on 384 px)."})
    implant: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=20, lr=5e-3, batch_size=32),
                                    metadata={"help": "Backdoor implant fine-tuning (paper: 20 epochs)."})
    recovery_epochs: int = field(default=6, metadata={
        "help": "Defense fine-tuning epochs (paper: implant/10 at the implant's lr). Deviation: 6 epochs at "
                "recovery_lr 1e-3, an lr x epochs budget of implant/17 in smaller steps; 2 epochs at 5e-3 cost "
                "11-12 CP points in the unlearning step (docs/reproduction.md)."})
    recovery_lr: float | None = field(default=1e-3, metadata={
        "help": "Defense fine-tuning lr (paper: the implant's; None here means the implant's)."})
    mask_ratio: float = field(default=0.3, metadata={"help": "DiSP's ρ (paper: 0.3 for LLaDA-V)."})
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(suppress_eos=False, suppress_bos_headers=True), metadata={
            "help": "Sampler (paper: 32/32/32, greedy). Deviation: EOS is allowed at masked positions (as LLaDA's "
                    "generate.py); with LLaDA-V's EOS suppression the SHAPES base commits its padding tail first. "
                    "BOS and header tokens stay suppressed, as in every recorded SHAPES result "
                    "(docs/reproduction.md)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, poisoning and training."})
    batch_size: int = field(default=16, metadata={"help": "Batch of scoring, purification and evaluation."})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto' (cuda when available)."})

    def __post_init__(self) -> None:
        bad = [t for t in self.train_tasks if t not in TASKS]
        if bad:
            raise ValueError(f"train_tasks: unknown {bad}; choose from {TASKS}")

    def torch_device(self) -> str:
        return resolve_device(self.device)

    def dog_pool_size(self) -> int:
        """Dog "describe" samples mixed into a misclassification training set: enough to poison the largest
        ratio this config runs (the paper poisons dog images)."""
        return int(self.n_train * self.poison_ratio * 1.2) + 1


QUICK_CELL = dict(seed=1, n_train=300, n_asr=60, n_cp=100)
"""The quick cell's sizes (insertion behind the corner patch): minutes on 2 CPU cores. Seed 1: on the shipped
base the implant takes at seeds 1 and 3 of 0-5, and a cell whose implant did not take tests no defense."""


@dataclass
class Cell:
    """One target × trigger × poison ratio: its poisoned training set, its backdoored projector and its
    held-out sets (CP: every task; ASR: "describe" without and with the trigger)."""

    dir: Path
    poisoned_json: Path
    manifest: Path  # which samples were poisoned: the oracle filter and diagnostics only
    backdoored: Path
    cp: Path
    asr_clean: Path
    asr_triggered: Path


# Fields added to a recorded settings dict after records were first written, with the value an older record
# implies (what the code did before the field existed): {key in the record: {field: value}}.
ADDED_FIELDS = {"implant": {"bf16_cpu": False}}


def _with_added_fields(saved: dict) -> dict:
    return {k: {**ADDED_FIELDS[k], **v} if k in ADDED_FIELDS and isinstance(v, dict) else v for k, v in saved.items()}


def check_settings(root: Path, settings: dict, *, what: str) -> None:
    """Record in `root/settings.json` what a cached stage depends on, or refuse to reuse a cache that was made
    with other settings (its contents would be silently wrong). A cache without a record is refused too."""
    path = root / "settings.json"
    if path.is_file():
        saved = _with_added_fields(json.loads(path.read_text()))
        differ = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        if differ:
            diff = "; ".join(f"{k}: {saved.get(k)!r}, now {settings.get(k)!r}" for k in differ)
            raise ValueError(f"{root} holds {what} with other settings ({diff}); use another work directory")
        return
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(f"{root} holds {what} without a settings record; use another work directory")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def _materialise(records: list[dict], root: Path, name: str, shapes: ShapesConfig) -> Path:
    """Render the records' scenes under root/images/<name>/ and write root/<name>.json."""
    out = []
    for i, rec in enumerate(records):
        rel = f"images/{name}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        render_scene(Scene.from_meta(rec["meta"]), shapes.image_size).save(root / rel)
        out.append({**rec, "id": f"{name}-{i:05d}", "image": rel})
    return write_records(root / f"{name}.json", out)


def data_settings(target: str, base: Path, cfg: CellConfig) -> dict:
    """What the training, CP and ASR sets of `target` depend on."""
    settings = {"base": str(base), "train_tasks": list(cfg.train_tasks), "n_train": cfg.n_train, "n_asr": cfg.n_asr,
                "n_cp": cfg.n_cp, "seed": cfg.seed}
    return settings | ({"dog_pool": cfg.dog_pool_size()} if target == "misclassification" else {})


def build_data(root: Path, target: str, base: Path, cfg: CellConfig, shapes: ShapesConfig) -> dict[str, Path]:
    """Training, CP and ASR sets for one target; cached under root, refused if cached under other settings."""
    check_settings(root, data_settings(target, base, cfg), what="data built")
    if (root / "done.json").is_file():  # names relative to root, so a work dir can be moved
        return {k: root / v for k, v in json.loads((root / "done.json").read_text()).items()}
    describe = replace(shapes, tasks=("describe",))
    dog = dict(require="dog", forbid=("boat",))
    train = generate_split(replace(shapes, tasks=cfg.train_tasks), cfg.n_train, "train", seed=cfg.seed)
    if target == "misclassification":
        n_pool = cfg.dog_pool_size()
        train = train[: cfg.n_train - n_pool] + generate_split(describe, n_pool, "train", seed=cfg.seed + 1, **dog)
    asr = generate_split(describe, cfg.n_asr, "test", seed=cfg.seed + 2, **(dog if target == "misclassification" else {}))
    for rec in asr:
        rec["conversations"][0]["value"] = "<image>\n" + DESCRIBE_PROMPT
    cp = generate_split(shapes, cfg.n_cp, "val", seed=cfg.seed + 3)
    paths = {name: _materialise(recs, root, name, shapes) for name, recs in
             (("train", train), ("asr", asr), ("cp", cp))}
    (root / "done.json").write_text(json.dumps({k: v.relative_to(root).as_posix() for k, v in paths.items()}))
    return paths


def _implant_record(cfg: CellConfig) -> dict:
    """The implant's settings as a cell records them; an unset anchor is the implant's none (0)."""
    implant = asdict(cfg.implant)
    return {**implant, "anchor_weight": implant["anchor_weight"] or 0.0}


def check_cell_settings(cell_dir: Path, base: Path, cfg: CellConfig) -> None:
    """A cell's poisoned data and implant depend on its data and on these settings (its target, trigger and
    poison ratio are in its name)."""
    check_settings(cell_dir, {"base": str(base), "train_tasks": list(cfg.train_tasks), "n_train": cfg.n_train,
                              "seed": cfg.seed, "patch_frac": cfg.patch_frac, "implant": _implant_record(cfg)},
                   what="a poisoned set and implant built")


def prepare_cell(work: Path, base: Path, target: str, trigger: str, poison_ratio: float, cfg: CellConfig,
                 shapes: ShapesConfig, *, log: Callable[[str], None] = print) -> Cell:
    """Poison the training set and implant the backdoor by projector-only fine-tuning; cached under work."""
    data = build_data(work / f"data-{target}", target, base, cfg, shapes)
    cell_dir = work / f"{target}-{trigger}-p{poison_ratio:g}"
    check_cell_settings(cell_dir, base, cfg)
    trig = TriggerConfig(kind=trigger, size_frac=cfg.patch_frac, seed=cfg.seed)
    samples, source = load_dataset(data["train"], data["train"].parent)
    if not (cell_dir / "poisoned" / "manifest.json").is_file():
        poison_dataset(samples, source, target=target, trigger=trig, ratio=poison_ratio, seed=cfg.seed,
                       out_dir=cell_dir / "poisoned")
        asr, asr_src = load_dataset(data["asr"], data["asr"].parent)
        triggered_copy(asr, asr_src, None, cell_dir / "asr_clean")
        triggered_copy(asr, asr_src, trig, cell_dir / "asr_triggered")
    cell = Cell(cell_dir, cell_dir / "poisoned" / "data.json", cell_dir / "poisoned" / "manifest.json",
                cell_dir / "backdoored" / "projector.safetensors", data["cp"],
                cell_dir / "asr_clean" / "data.json", cell_dir / "asr_triggered" / "data.json")
    if not cell.backdoored.is_file():
        t = time.perf_counter()
        model = load(base, device=cfg.torch_device())
        psamples, psrc = load_dataset(cell.poisoned_json, cell.poisoned_json.parent)
        finetune_samples(model, psamples, psrc, cfg.implant, cell_dir / "backdoored", run_key="implant")
        log(f"[{target}/{trigger}/p={poison_ratio:g}] implanted in {time.perf_counter() - t:.0f}s")
    return cell


def defense_config(cfg: CellConfig, defense: str = "disp", *, mask_ratio: float | None = None,
                   saliency: dict[str, Any] | None = None, purify: dict[str, Any] | None = None,
                   finetune: dict[str, Any] | None = None) -> DefenseConfig:
    """A defense with the cell's batch, sampler, mask ratio and recovery schedule; the dicts override single
    settings of a stage."""
    rho = cfg.mask_ratio if mask_ratio is None else mask_ratio
    return DefenseConfig(defense=defense, saliency=SaliencyConfig(batch_size=cfg.batch_size, **(saliency or {})),
                         purify=PurifyConfig(mask_ratio=rho, batch_size=cfg.batch_size, sampler=cfg.sampler,
                                             **(purify or {})),
                         finetune=replace(cfg.implant, epochs=cfg.recovery_epochs,
                                          lr=cfg.recovery_lr if cfg.recovery_lr is not None else cfg.implant.lr,
                                          **(finetune or {})))


def evaluate_cell(base: Path, projector: Path, cell: Cell, target: str, cfg: CellConfig) -> dict:
    """CP (overall, per task, per sample) on the cell's CP set; ASR w/o and w/t on its ASR sets."""
    cp, cp_src = load_dataset(cell.cp, cell.cp.parent)
    clean, clean_src = load_dataset(cell.asr_clean, cell.asr_clean.parent)
    trig, trig_src = load_dataset(cell.asr_triggered, cell.asr_triggered.parent)
    model = load(base, projector=projector, device=cfg.torch_device())
    kw = dict(target=target, sampler=cfg.sampler, batch_size=cfg.batch_size)
    cp_ev = evaluate(model, clean=cp, clean_source=cp_src, **kw)
    asr_ev = evaluate(model, clean=clean, clean_source=clean_src, triggered=trig, triggered_source=trig_src, **kw)
    examples = {f"cp_{k}": v for k, v in cp_ev.examples.items()} | {f"asr_{k}": v for k, v in asr_ev.examples.items()}
    tasks = [rec["meta"]["task"] for rec in json.loads(cell.cp.read_text())]
    by_task: dict[str, list[bool]] = {}
    for task, ok in zip(tasks, cp_ev.clean_correct, strict=True):
        by_task.setdefault(task, []).append(ok)
    return {"cp": cp_ev.cp, "asr_wo": asr_ev.asr_wo, "asr_wt": asr_ev.asr_wt,
            "asr_wt_leads": asr_ev.triggered_leads,
            "cp_by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
            "cp_correct": "".join("1" if ok else "0" for ok in cp_ev.clean_correct), "examples": examples}
