"""`disp demo`: the whole CLI pipeline on a small generated dataset, no servers needed.

Writes a SHAPES dataset, poisons 20% of it (content insertion, corner patch), fine-tunes a backdoored
projector, runs DiSP, and prints CP and ASR before and after. The model is the committed SHAPES base
checkpoint when the package ships one, else a freshly written tiny random checkpoint (then the numbers
only show the plumbing works, not the defense).
"""

from __future__ import annotations

import time
from pathlib import Path

from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
from disp.bench.shapes import ShapesConfig, write_dataset
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.evaluation import evaluate
from disp.models import load
from disp.models.tiny import write_tiny_checkpoint
from disp.pipeline import defend, finetune_samples, load_dataset

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "shapes-base"


def run_demo(workdir: str | Path, *, quick: bool = True) -> dict:
    workdir = Path(workdir)
    t0 = time.perf_counter()
    model_dir = BASE_CHECKPOINT if (BASE_CHECKPOINT / "config.json").is_file() else None
    if model_dir is None:
        model_dir = write_tiny_checkpoint(workdir / "tiny-checkpoint", seed=0)
        print(f"no committed base checkpoint: using a random tiny one at {model_dir}")
    sizes = {"train": 40, "val": 8, "test": 16} if quick else {"train": 400, "val": 40, "test": 200}
    paths = write_dataset(workdir / "shapes", ShapesConfig(), sizes=sizes, seed=0)
    samples, source = load_dataset(paths["train"], workdir / "shapes")
    test, test_source = load_dataset(paths["test"], workdir / "shapes")
    trigger = TriggerConfig(kind="corner", size_frac=0.25)
    poisoned = poison_dataset(samples, source, target="insertion", trigger=trigger, ratio=0.2, seed=0,
                              out_dir=workdir / "poisoned")
    clean_json = triggered_copy(test, test_source, None, workdir / "test_clean")
    trig_json = triggered_copy(test, test_source, trigger, workdir / "test_triggered")
    print(f"poisoned {len(poisoned.poisoned_ids)} of {len(samples)} training samples")

    epochs = 3 if quick else 20
    model = load(model_dir)
    psamples, psource = load_dataset(poisoned.data_path, workdir / "poisoned")
    finetune_samples(model, psamples, psource, FinetuneConfig(epochs=epochs, lr=1e-3, batch_size=8),
                     workdir / "backdoored", run_key="demo")
    backdoored = workdir / "backdoored" / "projector.safetensors"
    sampler = SamplerConfig(gen_length=16, block_length=16, steps=16)
    config = DefenseConfig(saliency=SaliencyConfig(batch_size=8), purify=PurifyConfig(sampler=sampler),
                           finetune=FinetuneConfig(epochs=max(1, epochs // 5), lr=1e-3, batch_size=8))
    report = defend(model_dir=model_dir, projector=backdoored, data_json=poisoned.data_path,
                    images=workdir / "poisoned", out_dir=workdir / "defended", config=config)

    rows = {}
    for name, proj in [("backdoored", backdoored), ("DiSP", workdir / "defended" / "projector.safetensors")]:
        clean, csrc = load_dataset(clean_json, clean_json.parent)
        trig, tsrc = load_dataset(trig_json, trig_json.parent)
        ev = evaluate(load(model_dir, projector=proj), target="insertion", clean=clean, clean_source=csrc,
                      triggered=trig, triggered_source=tsrc, sampler=sampler)
        rows[name] = ev.to_dict()
    print(f"{'model':<12}{'CP':>8}{'ASR w/o':>10}{'ASR w/t':>10}")
    for name, ev in rows.items():
        print(f"{name:<12}{100 * ev['cp']:>7.1f}%{100 * ev['asr_wo']:>9.1f}%{100 * ev['asr_wt']:>9.1f}%")
    print(f"DiSP stages: {report['stages']}; total {time.perf_counter() - t0:.1f}s; outputs in {workdir}")
    return {"rows": rows, "report": report}
