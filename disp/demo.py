"""The demo's inputs and scoring, shared by `disp demo --local` (in-process) and `disp demo` (the service).

Writes a SHAPES dataset, poisons 20% of it (content insertion, corner patch), fine-tunes a backdoored
projector, and after a defense prints CP and ASR before and after. The model is the committed SHAPES
base checkpoint when the package ships one, else a freshly written tiny random checkpoint (then the
numbers only show the plumbing works, not the defense).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
from disp.bench.shapes import config_of_checkpoint, write_dataset
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.evaluation import evaluate
from disp.models import load
from disp.models.tiny import write_tiny_checkpoint
from disp.pipeline import defend, finetune_samples, load_dataset

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "shapes-base"
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=16, suppress_eos=False)  # as the reproduction decodes


@dataclass
class DemoInputs:
    model_dir: Path  # the base checkpoint
    backdoored: Path  # projector fine-tuned on the poisoned data
    poisoned_dir: Path  # poisoned LLaVA data.json + images/ (+ manifest.json, which defenses never read)
    clean_json: Path  # held-out clean test set
    triggered_json: Path  # the same with the trigger
    target: str
    n_poisoned: int
    n_train: int


def prepare_inputs(workdir: str | Path, *, quick: bool = True) -> DemoInputs:
    """Poisoned SHAPES data and a projector backdoored on it by fine-tuning."""
    workdir = Path(workdir)
    model_dir = BASE_CHECKPOINT if (BASE_CHECKPOINT / "config.json").is_file() else None
    if model_dir is None:
        model_dir = write_tiny_checkpoint(workdir / "tiny-checkpoint", seed=0)
        print(f"no committed base checkpoint: using a random tiny one at {model_dir}")
    sizes = {"train": 40, "val": 8, "test": 16} if quick else {"train": 400, "val": 40, "test": 200}
    paths = write_dataset(workdir / "shapes", config_of_checkpoint(model_dir), sizes=sizes, seed=0)
    samples, source = load_dataset(paths["train"], workdir / "shapes")
    test, test_source = load_dataset(paths["test"], workdir / "shapes")
    trigger = TriggerConfig(kind="corner", size_frac=0.25)
    poisoned = poison_dataset(samples, source, target="insertion", trigger=trigger, ratio=0.2, seed=0,
                              out_dir=workdir / "poisoned")
    clean_json = triggered_copy(test, test_source, None, workdir / "test_clean")
    triggered_json = triggered_copy(test, test_source, trigger, workdir / "test_triggered")
    psamples, psource = load_dataset(poisoned.data_path, workdir / "poisoned")
    finetune_samples(load(model_dir), psamples, psource,
                     FinetuneConfig(epochs=3 if quick else 20, lr=5e-3, batch_size=8), workdir / "backdoored",
                     run_key="demo")
    print(f"poisoned {len(poisoned.poisoned_ids)} of {len(samples)} training samples")
    return DemoInputs(Path(model_dir), workdir / "backdoored" / "projector.safetensors", workdir / "poisoned",
                      clean_json, triggered_json, "insertion", len(poisoned.poisoned_ids), len(samples))


def evaluate_projectors(inputs: DemoInputs, projectors: dict[str, Path],
                        sampler: SamplerConfig = SAMPLER) -> dict[str, dict]:
    """CP and ASR w/o and w/t for each named projector over the base checkpoint."""
    clean, csrc = load_dataset(inputs.clean_json, inputs.clean_json.parent)
    trig, tsrc = load_dataset(inputs.triggered_json, inputs.triggered_json.parent)
    return {name: evaluate(load(inputs.model_dir, projector=path), target=inputs.target, clean=clean,
                           clean_source=csrc, triggered=trig, triggered_source=tsrc, sampler=sampler).to_dict()
            for name, path in projectors.items()}


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'model':<18}{'CP':>8}{'ASR w/o':>10}{'ASR w/t':>10}")
    for name, ev in rows.items():
        print(f"{name:<18}{100 * ev['cp']:>7.1f}%{100 * ev['asr_wo']:>9.1f}%{100 * ev['asr_wt']:>9.1f}%")


def run_demo(workdir: str | Path, *, quick: bool = True) -> dict:
    """The pipeline in this process: prepare, `defend`, evaluate, print."""
    workdir = Path(workdir)
    t0 = time.perf_counter()
    inputs = prepare_inputs(workdir, quick=quick)
    config = DefenseConfig(saliency=SaliencyConfig(batch_size=8), purify=PurifyConfig(sampler=SAMPLER),
                           finetune=FinetuneConfig(epochs=1 if quick else 4, lr=1e-3, batch_size=8))
    report = defend(model_dir=inputs.model_dir, projector=inputs.backdoored,
                    data_json=inputs.poisoned_dir / "data.json", images=inputs.poisoned_dir,
                    out_dir=workdir / "defended", config=config)
    rows = evaluate_projectors(inputs, {"backdoored": inputs.backdoored,
                                        "DiSP": workdir / "defended" / "projector.safetensors"})
    print_table(rows)
    print(f"DiSP stages: {report['stages']}; total {time.perf_counter() - t0:.1f}s; outputs in {workdir}")
    return {"rows": rows, "report": report}
