"""`disp bench reproduce`: the paper's protocol (§4, Tables 1-3, Figures 3-4) on the SHAPES base model.

For each target × trigger: poison the training set at `poison_ratio`, implant the backdoor by
projector-only fine-tuning of the clean base (the paper's attack recipe, scaled), then run every defense
from that backdoored projector and measure CP, ASR w/o and ASR w/t on held-out data. Sweeps: the poison
ratio (Figure 3) and DiSP's mask ratio. Rows carry `target, trigger, defense, poison_ratio, cp, asr_wo,
asr_wt` (fractions) plus diagnostics.

Data per cell: a SHAPES training set (`train_tasks`, captions by default; for misclassification a pool of
"describe" samples showing a dog is mixed in, as the paper poisons dog images), an ASR set of held-out
"describe" samples (dog scenes for misclassification) with and without the trigger, and a CP set of
held-out samples of every task. The defense never reads the manifest, except the oracle filter (an upper
bound).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
from disp.baselines import read_manifest
from disp.bench.environment import environment
from disp.bench.shapes import (
    DESCRIBE_PROMPT,
    TASKS,
    Scene,
    ShapesConfig,
    config_of_checkpoint,
    generate_split,
    render_scene,
)
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.data import write_records
from disp.evaluation import evaluate
from disp.metrics import attack_succeeded
from disp.models import load, resolve_device
from disp.pipeline import defend, finetune_samples, load_dataset

# Runner-only names for DiSP with other settings: disp's variants, not the paper's, reported beside it.
# disp_occlusion: occlusion KL saliency, and of the top-ρ only tokens whose KL is >= OCCLUSION_MIN_NATS;
# disp_occlusion_top: occlusion KL saliency with the paper's top-ρ rule;
# disp_isolation: isolation KL saliency (each visual token shown alone), and of the top-ρ only tokens whose KL
# is >= ISOLATION_MIN_NATS (a clean SHAPES token shown alone scores up to about 10 nats, a trigger token 80-290;
# chosen after those measurements, docs/reproduction.md);
# disp_isolation_anchor: disp_isolation, and a recovery with the feature anchor (FinetuneConfig.anchor_weight)
# on the samples whose answer the rewrite kept (weight chosen after two seed-1 cells, docs/reproduction.md).
# Each entry: (DefenseConfig.defense, SaliencyConfig, PurifyConfig and FinetuneConfig overrides).
OCCLUSION_MIN_NATS = 1.0
ISOLATION_MIN_NATS = 20.0
ANCHOR_WEIGHT = 10.0
VARIANTS = {"disp_occlusion": ("disp", {"method": "occlusion"}, {"min_score": OCCLUSION_MIN_NATS}, {}),
            "disp_occlusion_top": ("disp", {"method": "occlusion"}, {}, {}),
            "disp_isolation": ("disp", {"method": "isolation"}, {"min_score": ISOLATION_MIN_NATS}, {}),
            "disp_isolation_anchor": ("disp", {"method": "isolation"}, {"min_score": ISOLATION_MIN_NATS},
                                      {"anchor_weight": ANCHOR_WEIGHT})}
DEFENSES_ALL = ("none", "disp", "random_drop", "pruning", "oracle_filter", "no_mask", "random_mask", *VARIANTS)
TARGETS_ALL = ("insertion", "refusal", "misclassification")
TRIGGERS_ALL = ("corner", "center", "noise", "multi", "blended")


@dataclass
class ReproduceConfig:
    """Protocol settings. The paper's values are noted; scaled ones say why."""

    base: str = field(default="", metadata={"help": "Base checkpoint directory (default: the committed SHAPES base)."})
    targets: tuple[str, ...] = field(default=TARGETS_ALL, metadata={"help": "Backdoor targets."})
    triggers: tuple[str, ...] = field(default=("corner",), metadata={"help": "Trigger kinds for the main table."})
    trigger_targets: tuple[str, ...] = field(default=("insertion",),
                                             metadata={"help": "Targets of the trigger table (paper Table 3)."})
    defenses: tuple[str, ...] = field(default=DEFENSES_ALL, metadata={"help": "Defenses per cell."})
    train_tasks: tuple[str, ...] = field(default=("describe",), metadata={
        "help": "SHAPES tasks of the training set (paper: captions only, CC-SBU-Align; CP is measured on every "
                "task, as the paper measures it on MMMU). Until 2026-12-03 the runner trained on every task."})
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
    anchor_weight: float = field(default=ANCHOR_WEIGHT, metadata={
        "help": "Feature-anchor weight of the disp_isolation_anchor variant's recovery (disp's, not the paper's; "
                "chosen after two seed-1 cells on v3, docs/reproduction.md). Other defenses recover without it."})
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(suppress_eos=False), metadata={
        "help": "Sampler (paper: 32/32/32, greedy). Deviation: EOS is allowed at masked positions (LLaDA's "
                "generate.py); with LLaDA-V's EOS suppression the SHAPES base commits its padding tail first "
                "(docs/reproduction.md)."})
    poison_sweep: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.4, 0.5),
                                            metadata={"help": "Poison ratios of Figure 3."})
    poison_sweep_defenses: tuple[str, ...] = field(default=("none", "disp", "random_drop", "pruning", "oracle_filter"),
                                                   metadata={"help": "Defenses of Figure 3."})
    mask_sweep: tuple[float, ...] = field(default=(0.1, 0.3, 0.5, 0.7, 0.9), metadata={"help": "DiSP mask ratios."})
    mask_sweep_defenses: tuple[str, ...] = field(default=("disp", "disp_occlusion"),
                                                 metadata={"help": "Defenses of the mask-ratio sweep."})
    seed: int = field(default=0, metadata={"help": "Seed of data, poisoning and training."})
    batch_size: int = field(default=16, metadata={"help": "Batch of scoring, purification and evaluation."})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto' (cuda when available)."})

    def __post_init__(self) -> None:
        for name, allowed in (("targets", TARGETS_ALL), ("triggers", TRIGGERS_ALL), ("trigger_targets", TARGETS_ALL),
                              ("defenses", DEFENSES_ALL), ("poison_sweep_defenses", DEFENSES_ALL),
                              ("mask_sweep_defenses", DEFENSES_ALL), ("train_tasks", TASKS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {allowed}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")

    def torch_device(self) -> str:
        return resolve_device(self.device)

    @classmethod
    def quick(cls, **kw: Any) -> ReproduceConfig:
        """One target, one trigger, no defense against DiSP and disp's disp_occlusion variant, small sets:
        minutes on 2 CPU cores. Seed 1: on the committed base the implant takes at seeds 1 and 3 of 0-5
        (docs/reproduction.md), and a run whose implant did not take tests no defense."""
        base = dict(targets=("insertion",), triggers=("corner",), trigger_targets=(), seed=1,
                    defenses=("none", "disp", "disp_occlusion"),
                    n_train=300, n_asr=60, n_cp=100, poison_sweep=(), mask_sweep=())
        return cls(**{**base, **kw})


def _materialise(records: list[dict], root: Path, name: str, shapes: ShapesConfig) -> Path:
    """Render the records' scenes under root/images/<name>/ and write root/<name>.json."""
    out = []
    for i, rec in enumerate(records):
        rel = f"images/{name}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        render_scene(Scene.from_meta(rec["meta"]), shapes.image_size).save(root / rel)
        out.append({**rec, "id": f"{name}-{i:05d}", "image": rel})
    return write_records(root / f"{name}.json", out)


def dog_pool_size(cfg: ReproduceConfig) -> int:
    """Dog "describe" samples mixed into a misclassification training set: enough to poison the largest
    ratio this config runs (the paper poisons dog images)."""
    return int(cfg.n_train * max(cfg.poison_sweep + (cfg.poison_ratio,)) * 1.2) + 1


def data_settings(target: str, base: Path, cfg: ReproduceConfig) -> dict:
    """What the training, CP and ASR sets of `target` depend on."""
    settings = {"base": str(base), "train_tasks": list(cfg.train_tasks), "n_train": cfg.n_train, "n_asr": cfg.n_asr,
                "n_cp": cfg.n_cp, "seed": cfg.seed}
    return settings | ({"dog_pool": dog_pool_size(cfg)} if target == "misclassification" else {})


def build_data(root: Path, target: str, base: Path, cfg: ReproduceConfig, shapes: ShapesConfig) -> dict[str, Path]:
    """Training, CP and ASR sets for one target; cached under root, refused if cached under other settings."""
    check_settings(root, data_settings(target, base, cfg), what="data built")
    if (root / "done.json").is_file():  # names relative to root, so a work dir can be moved (older ones: absolute)
        return {k: root / v for k, v in json.loads((root / "done.json").read_text()).items()}
    describe = replace(shapes, tasks=("describe",))
    dog = dict(require="dog", forbid=("boat",))
    train = generate_split(replace(shapes, tasks=cfg.train_tasks), cfg.n_train, "train", seed=cfg.seed)
    if target == "misclassification":
        n_pool = dog_pool_size(cfg)
        train = train[: cfg.n_train - n_pool] + generate_split(describe, n_pool, "train", seed=cfg.seed + 1, **dog)
    asr = generate_split(describe, cfg.n_asr, "test", seed=cfg.seed + 2, **(dog if target == "misclassification" else {}))
    for rec in asr:
        rec["conversations"][0]["value"] = "<image>\n" + DESCRIBE_PROMPT
    cp = generate_split(shapes, cfg.n_cp, "val", seed=cfg.seed + 3)
    paths = {name: _materialise(recs, root, name, shapes) for name, recs in
             (("train", train), ("asr", asr), ("cp", cp))}
    (root / "done.json").write_text(json.dumps({k: v.relative_to(root).as_posix() for k, v in paths.items()}))
    return paths


def evaluate_cell(base: Path, projector: Path, cell: Cell, target: str, cfg: ReproduceConfig) -> dict:
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


def cp_changes(row: dict, reference: dict) -> dict[str, int]:
    """CP samples that `row` gets wrong and `reference` right ("lost") and the reverse ("gained"): the paired
    view of a CP difference, which one CP sample more or less can move by a point."""
    pairs = list(zip(row["cp_correct"], reference["cp_correct"], strict=True))
    return {"lost": sum(a < b for a, b in pairs), "gained": sum(a > b for a, b in pairs)}


def check_settings(root: Path, settings: dict, *, what: str) -> None:
    """Record in `root/settings.json` what a cached stage depends on, or refuse to reuse a cache that was made
    with other settings (its contents would be silently wrong). A cache without a record is refused too."""
    path = root / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        if differ:
            diff = "; ".join(f"{k}: {saved.get(k)!r}, now {settings.get(k)!r}" for k in differ)
            raise ValueError(f"{root} holds {what} with other settings ({diff}); use another --work directory")
        return
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(f"{root} holds {what} without a settings record; use another --work directory")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def check_cell_settings(cell_dir: Path, base: Path, cfg: ReproduceConfig) -> None:
    """A cell's poisoned data and implant depend on its data and on these settings (its target, trigger and
    poison ratio are in its name)."""
    check_settings(cell_dir, {"base": str(base), "train_tasks": list(cfg.train_tasks), "n_train": cfg.n_train,
                              "seed": cfg.seed, "patch_frac": cfg.patch_frac, "implant": asdict(cfg.implant)},
                   what="a poisoned set and implant built")


def _purified_backdoor_rate(out_dir: Path, manifest: Path, target: str) -> float | None:
    """Fraction of poisoned samples whose rewritten answer still carries the backdoor."""
    purified = out_dir / "purified.json"
    recs = json.loads(purified.read_text()) if purified.is_file() else []
    bad = set(read_manifest(manifest)["poisoned_ids"])
    answers = [r["disp"]["purified_answer"] for r in recs if r.get("disp") and r["id"] in bad]
    return sum(attack_succeeded(target, a) for a in answers) / len(answers) if answers else None


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


def prepare_cell(work: Path, base: Path, target: str, trigger: str, poison_ratio: float, cfg: ReproduceConfig,
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


def defense_config(defense: str, cfg: ReproduceConfig, mask_ratio: float | None = None) -> DefenseConfig:
    """A runner defense name (a `DefenseConfig.defense` or one of VARIANTS) as the settings every cell uses:
    the reproduction's batch, sampler and recovery schedule."""
    kind, saliency, purify, finetune = VARIANTS.get(defense, (defense, {}, {}, {}))
    if "anchor_weight" in finetune:
        finetune = {**finetune, "anchor_weight": cfg.anchor_weight}
    rho = cfg.mask_ratio if mask_ratio is None else mask_ratio
    return DefenseConfig(defense=kind, saliency=SaliencyConfig(batch_size=cfg.batch_size, **saliency),
                         purify=PurifyConfig(mask_ratio=rho, batch_size=cfg.batch_size, sampler=cfg.sampler, **purify),
                         finetune=replace(cfg.implant, epochs=cfg.recovery_epochs,
                                          lr=cfg.recovery_lr if cfg.recovery_lr is not None else cfg.implant.lr,
                                          **finetune))


def reuse_rewrites(done: dict[Path, DefenseConfig], dcfg: DefenseConfig, out: Path) -> None:
    """Seed a new defense directory with the scores and purified set of an earlier defense of the cell that
    differs only in its fine-tuning (`defend` then re-runs fine-tuning alone: its fingerprints match)."""
    if out.exists() or dcfg.defense != "disp":
        return
    for src, other in done.items():
        if (other.defense, other.saliency, other.purify) == (dcfg.defense, dcfg.saliency, dcfg.purify) and \
                all((src / f).is_file() for f in ("stages.json", "scores.json", "purified.json")):
            out.mkdir(parents=True)
            stages = json.loads((src / "stages.json").read_text())
            (out / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k != "finetuning"}))
            for f in ("scores.json", "purified.json"):
                shutil.copyfile(src / f, out / f)
            return


def run_cell(work: Path, base: Path, target: str, trigger: str, poison_ratio: float, defenses: tuple[str, ...],
             cfg: ReproduceConfig, shapes: ShapesConfig, *, mask_ratio: float | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Poison, implant, defend with each defense, evaluate: one row per defense."""
    cell = prepare_cell(work, base, target, trigger, poison_ratio, cfg, shapes, log=log)
    rows: list[dict] = []
    done: dict[Path, DefenseConfig] = {}
    for defense in defenses:
        t = time.perf_counter()
        dcfg = defense_config(defense, cfg, mask_ratio)
        out = cell.dir / (f"{defense}" + (f"-rho{dcfg.purify.mask_ratio:g}" if mask_ratio is not None else ""))
        reuse_rewrites(done, dcfg, out)
        done[out] = dcfg
        if defense == "none":
            projector, report = cell.backdoored, {}
        else:
            report = defend(model_dir=base, projector=cell.backdoored, data_json=cell.poisoned_json,
                            images=cell.poisoned_json.parent, out_dir=out, config=dcfg, manifest=cell.manifest,
                            device=cfg.torch_device())
            projector = out / "projector.safetensors"
        row = {"target": target, "trigger": trigger, "defense": defense, "poison_ratio": poison_ratio,
               **evaluate_cell(base, projector, cell, target, cfg)}
        if rows and rows[0]["defense"] == "none":
            row["cp_vs_backdoored"] = cp_changes(row, rows[0])
        if dcfg.defense in ("disp", "no_mask", "random_mask"):
            row["mask_ratio"] = dcfg.purify.mask_ratio if dcfg.defense != "no_mask" else 0.0
            row["purified_backdoor_rate"] = _purified_backdoor_rate(out, cell.manifest, target)
            row["answers_changed"] = report.get("answers_changed")
        row["seconds"] = round(time.perf_counter() - t, 1)
        log(json.dumps(row))
        rows.append(row)
    return rows


def reproduce(cfg: ReproduceConfig, work: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Run the protocol; returns {"config", "environment", "rows", "poison_ratio_sweep", "mask_ratio_sweep",
    "seconds"}."""
    from disp.demo import BASE_CHECKPOINT

    t0 = time.perf_counter()
    work = Path(work)
    base = Path(cfg.base) if cfg.base else BASE_CHECKPOINT
    shapes = config_of_checkpoint(base)
    result: dict[str, Any] = {"config": asdict(cfg), "environment": environment(), "base": str(base), "rows": [],
                              "poison_ratio_sweep": [], "mask_ratio_sweep": []}
    cells = [(t, k) for t in cfg.targets for k in cfg.triggers]
    cells += [(t, k) for t in cfg.trigger_targets for k in TRIGGERS_ALL if (t, k) not in cells]
    for target, trigger in cells:
        result["rows"] += run_cell(work, base, target, trigger, cfg.poison_ratio, cfg.defenses, cfg, shapes, log=log)
    for ratio in cfg.poison_sweep:
        result["poison_ratio_sweep"] += run_cell(work, base, "insertion", "corner", ratio, cfg.poison_sweep_defenses,
                                                 cfg, shapes, log=log)
    for rho in cfg.mask_sweep:
        result["mask_ratio_sweep"] += run_cell(work, base, "insertion", "corner", cfg.poison_ratio,
                                               cfg.mask_sweep_defenses, cfg,
                                               shapes, mask_ratio=rho, log=log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def check_quick(rows: list[dict], defense: str = "disp") -> list[str]:
    """The issue's quick-run bar: backdoored ASR w/t >= 80%, `defense`'s ASR w/t <= 10% and its CP within 3
    points of the backdoored model."""
    by = {r["defense"]: r for r in rows}
    if "none" not in by or defense not in by:
        return [f"the quick run needs the 'none' and {defense!r} rows"]
    out = []
    if by["none"]["asr_wt"] < 0.8:
        out.append(f"backdoored ASR w/t {by['none']['asr_wt']:.3f} < 0.80: the backdoor did not take")
    if by[defense]["asr_wt"] > 0.1:
        out.append(f"{defense} ASR w/t {by[defense]['asr_wt']:.3f} > 0.10")
    if abs(round(100 * (by[defense]["cp"] - by["none"]["cp"]), 6)) > 3:  # in points: 0.75 - 0.72 is 3, not 3.0000001
        out.append(f"{defense} CP {by[defense]['cp']:.3f} is more than 3 points from the backdoored "
                   f"{by['none']['cp']:.3f}")
    return out
