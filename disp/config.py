"""Algorithm settings: one dataclass per stage, each field with a help text, published defaults.

Defaults follow the paper (§3.3, App. B) and the official implementation: M = 6 Hutchinson probes on the
top-5 logits with factor 0.5, mask ratio ρ = 0.3, 32 generation steps over a 32-token answer in one
block, projector fine-tuning at lr 1e-4 for 4 epochs. One exception, chosen on measured evidence
(docs/saliency.md): the saliency is disp's `split_isolation`, with its 20-nat floor, a cap of 0.5 on held tokens
and the anchored recovery; `method="fisher"` gives the paper's DiSP exactly (its floor and anchor then default to
off, ρ to 0.3). The CLI's flags and the service's pydantic schemas are generated from these classes
(`disp.cli_flags`, `api.settings_schema`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from disp import stages

REMASKING = ("low_confidence", "random")
SCHEDULES = ("uniform", "shift", "logit_normal")
QUESTIONS = ("sample", "describe")
DESCRIBE_QUESTION = "Describe this image in detail."  # the official DiSP code's purification prompt
SALIENCY_METHODS = ("fisher", "occlusion", "isolation", "split_isolation")
# Scores in nats of a token shown alone (isolation, split_isolation): a clean SHAPES token scores up to ~10, a
# trigger token 80-290 (docs/findings.md). With them disp holds only tokens above a floor and anchors recovery.
ISOLATION_METHODS = ("isolation", "split_isolation")
ISOLATION_MIN_SCORE = 20.0  # nats
ISOLATION_ANCHOR_WEIGHT = 10.0
PAPER_MASK_RATIO = 0.3  # ρ for LLaDA-V (paper App. B)
# split_isolation's cap on held tokens: its floor decides which are held, and the ranges it leaves whole compete
# for the cap with the trigger's own tokens (a blended trigger sets off 6-10 of SHAPES' 36 tokens alone)
SPLIT_MASK_RATIO = 0.5
DEFENSES = tuple(stages.DEFENSES)


def _help(text: str, default: Any, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its help text (and, for a closed set of values, its choices), read by the CLI's flags and
    the API's schemas."""
    return field(default=default, metadata={"help": text, **({"choices": choices} if choices else {})})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class LaViDaSampling:
    """LaViDa's own sampler options (`llada/generate.py`), read only when the model is a LaViDa.

    LaViDa's `generate` ignores `steps`: it runs gen_length / num_blocks steps per block (or
    `step_per_block`, capped at block_length), times `step_ratio` (truncated). The defaults are those of
    LaViDa's captioning evaluation, `eval/run_coco.sh`: `prefix_lm=True, step_ratio=0.5, schedule=shift,
    schedule__shift=0.33`; lmms-eval's `llava_llada.py` forces temperature 0. The DiSP paper (App. B.1) ran
    LaViDa with max_new_tokens 32, block_length 32, step_ratio 0.5 and the prefix KV cache disabled:
    `prefix_lm=False, kv_cache=False` here.

    Args:
        step_ratio: fraction of each block's steps run (LaViDa's `step_ratio`).
        step_per_block: steps per block (LaViDa's `step_per_block`, capped at block_length); 0: gen_length /
            number of blocks. Upstream refuses it together with a step_ratio: set step_ratio 1 with it.
        schedule: tokens committed per step: "uniform" (even split), "shift" (σ = s·t / (1 + (s − 1)·t)) or
            "logit_normal" (σ = Φ(logit t)), each step committing at least one.
        shift: s of the shift schedule (run_coco.sh: 0.33; LaViDa's default 3).
        prefix_lm: prefix-DLM attention: the prompt does not attend to the answer (LaViDa's `prefix_lm`).
        kv_cache: compute the prompt's keys/values once and reuse them every step (exact under prefix_lm,
            which LaViDa's `prefix_lm=True` always does).
    """

    step_ratio: float = _help("LaViDa: fraction of each block's denoising steps run (LaViDa step_ratio; run_coco.sh: 0.5).",
                              0.5)
    step_per_block: int = _help("LaViDa: steps per block, capped at block_length (LaViDa step_per_block); 0: gen_length / "
                                "blocks. Needs step_ratio 1.", 0)
    schedule: str = _help("LaViDa: tokens per step: 'uniform', 'shift' or 'logit_normal' (run_coco.sh: shift).", "shift",
                          SCHEDULES)
    shift: float = _help("LaViDa: s of the shift schedule s*t/(1+(s-1)*t) (run_coco.sh: 0.33).", 0.33)
    prefix_lm: bool = _help("LaViDa: prefix-DLM attention, the prompt does not attend to the answer (run_coco.sh: on; "
                            "the DiSP paper: off).", True)
    kv_cache: bool = _help("LaViDa: reuse the prompt's keys/values across steps; needs prefix_lm.", True)

    def __post_init__(self) -> None:
        _check(0 < self.step_ratio <= 1, f"step_ratio must be in (0, 1], got {self.step_ratio}")
        _check(self.step_per_block >= 0, f"step_per_block must be >= 0, got {self.step_per_block}")
        _check(not (self.step_per_block and self.step_ratio != 1),
               f"step_per_block {self.step_per_block} and step_ratio {self.step_ratio} both set: LaViDa takes one "
               "of them (set step_ratio 1 with step_per_block)")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.shift > 0, f"shift must be positive, got {self.shift}")
        _check(not self.kv_cache or self.prefix_lm,
               "kv_cache is exact only under the prefix-DLM mask: set prefix_lm, or turn kv_cache off too")

    def steps_per_block(self, gen_length: int, block_length: int) -> int:
        """Denoising steps of each block, as LaViDa's `generate` counts them."""
        steps = min(self.step_per_block, block_length) if self.step_per_block else gen_length // (
            gen_length // block_length)
        return int(steps * self.step_ratio)


@dataclass
class SamplerConfig:
    """Masked-diffusion sampling (LLaDA-V `generate_with_embeds` semantics; LaViDa's in `lavida`).

    Args:
        gen_length: answer length in tokens.
        block_length: semi-autoregressive block length; must divide gen_length.
        steps: denoising steps over the whole answer; must be a multiple of gen_length / block_length.
            (LaViDa ignores it, as its `generate` does; see `LaViDaSampling`.)
        temperature: Gumbel-noise temperature; 0 is deterministic argmax.
        remasking: which masked positions to commit each step: "low_confidence" or "random".
        suppress_eos: never propose EOS at a masked position (LLaDA-V). When False a committed EOS ends the
            answer like <|eot_id|>, and, unless `suppress_bos_headers` says otherwise, no token is suppressed
            at all: LLaDA's `generate.py`.
        suppress_bos_headers: never propose BOS or a header token at a masked position (LLaDA-V). None
            (default): the same as `suppress_eos`.
        lavida: LaViDa's own options (a LaViDa model's sampler reads them; LLaDA-V's does not).
        confidence_threshold: approximate, parallel decoding (Fast-dLLM): a step also commits every masked
            position of the current block whose confidence exceeds this, so a block can finish in fewer steps
            (each step still commits at least its scheduled count). 1 (default): off, the exact sampler.
            Needs low_confidence remasking.
        prompt_cache_refresh: approximate prompt key/value reuse (dLLM-Cache / Fast-dLLM prefix cache): every
            this many steps of a block (and at each block's start) a full forward computes the prompt's
            keys/values; the steps between run the answer alone, attending to them. 0 (default): off, every
            step a full forward; 1 gives the same answers as 0. LLaDA-V only (LaViDa: `lavida.kv_cache`,
            exact under prefix_lm).
    """

    gen_length: int = _help("Answer length in tokens.", 32)
    block_length: int = _help("Block length of semi-autoregressive decoding; divides gen_length.", 32)
    steps: int = _help("Denoising steps over the whole answer (LaViDa ignores it, as its generate does).", 32)
    temperature: float = _help("Gumbel-noise temperature; 0 means deterministic argmax.", 0.0)
    remasking: str = _help("Commit order: 'low_confidence' or 'random'.", "low_confidence", REMASKING)
    suppress_eos: bool = _help("Never propose EOS at masked positions (LLaDA-V). False: a committed EOS ends the "
                               "answer, and with suppress_bos_headers unset no token is suppressed (LLaDA's "
                               "generate.py).", True)
    suppress_bos_headers: bool | None = _help("Never propose BOS or a header token at masked positions (LLaDA-V); "
                                              "unset: as suppress_eos.", None)
    lavida: LaViDaSampling = field(default_factory=LaViDaSampling,
                                   metadata={"help": "LaViDa's sampler options (LaViDa models only)."})
    confidence_threshold: float = _help(
        "Approximate (Fast-dLLM parallel decoding): also commit every masked position of the block whose "
        "confidence exceeds this; 1 = off (exact). Measured at 0.99 on four SHAPES cells (experiments/results/fast): "
        "12-31x fewer purification FLOPs, 91-100% of rewrites identical to exact, CP and ASR w/t equal on three "
        "(CP +4 points with the paper's Fisher saliency on the saturated v3 base); at 0.9, CP +3 on the quick cell.",
        1.0)
    prompt_cache_refresh: int = _help(
        "Approximate (dLLM-Cache / Fast-dLLM prefix cache; LLaDA-V): recompute the prompt's keys/values every N "
        "steps and run only the answer in between; 0 = off (exact). Measured at 8 on four SHAPES cells: 2.3x fewer "
        "purification FLOPs, 97-100% of rewrites identical to exact, CP within 1 point and ASR w/t equal on all "
        "four; 6.3x fewer FLOPs predicted at LLaDA-V's 8B shape (experiments/results/fast).", 0)

    def __post_init__(self) -> None:
        if isinstance(self.lavida, dict):
            self.lavida = LaViDaSampling(**self.lavida)
        _check(self.gen_length > 0, f"gen_length must be positive, got {self.gen_length}")
        _check(self.block_length > 0, f"block_length must be positive, got {self.block_length}")
        _check(
            self.gen_length % self.block_length == 0,
            f"block_length {self.block_length} must divide gen_length {self.gen_length}",
        )
        blocks = self.gen_length // self.block_length
        _check(
            self.steps > 0 and self.steps % blocks == 0,
            f"steps {self.steps} must be a positive multiple of the number of blocks {blocks}",
        )
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.remasking in REMASKING, f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        _check(0 < self.confidence_threshold <= 1,
               f"confidence_threshold must be in (0, 1] (1 = off), got {self.confidence_threshold}")
        _check(self.confidence_threshold == 1 or self.remasking == "low_confidence",
               f"confidence_threshold {self.confidence_threshold} needs remasking 'low_confidence', "
               f"got {self.remasking!r}")
        _check(self.prompt_cache_refresh >= 0,
               f"prompt_cache_refresh must be >= 0 (0 = off), got {self.prompt_cache_refresh}")

    @property
    def suppresses_bos_headers(self) -> bool:
        return self.suppress_eos if self.suppress_bos_headers is None else self.suppress_bos_headers


@dataclass
class SaliencyConfig:
    """Fisher–Jacobian visual-token saliency (paper Eq. 3–8).

    Args:
        probes: Hutchinson probes M per sample (Eq. 8).
        topk: vocabulary entries kept per generated position when forming the Fisher matrix.
        factor: constant in front of the estimate (0.5 from the KL's second-order term, Eq. 4).
        exact: compute the quadratic form exactly with Jacobian-vector products instead of probes.
        method: "split_isolation" (the default, disp's: see below); "fisher", the paper's second-order score
            (Eq. 5–8); "occlusion", not the paper's: the
            exact KL divergence that Eq. 4 expands, one forward per masked visual token (disp's variant);
            "isolation", not the paper's either: the KL between the first step with visual token i shown
            alone (every other one masked) and with all of them masked (disp's variant for triggers that
            span several tokens); "split_isolation", disp's too: the same KL for contiguous ranges of visual
            tokens shown alone, halving best-first the range whose tokens are credited most, at most
            `split_budget` forwards (`disp.split_isolation`).
        occlusion_rows: rows (sample × visual token, or sample × range) per forward pass of the occlusion,
            isolation and split_isolation methods.
        split_groups: ranges the visual tokens are first cut into (split_isolation).
        split_beam: ranges halved per round, those whose tokens are credited most first (split_isolation).
        split_budget: forwards per sample spent on ranges, the all-masked reference not counted
            (split_isolation).
        batch_size: samples scored per forward/backward pass.
        seed: seed of the probe noise.
    """

    probes: int = _help("Hutchinson probes M per sample (Eq. 8).", 6)
    topk: int = _help("Top-k vocabulary entries per generated position in the Fisher matrix.", 5)
    factor: float = _help("Scale of the quadratic form (1/2 from the KL expansion, Eq. 4).", 0.5)
    exact: bool = _help("Exact quadratic form via Jacobian-vector products (slow; for verification).", False)
    method: str = _help("'split_isolation' (disp's default: the KL of showing contiguous ranges of visual tokens "
                        "alone, halved best-first where it is high, 1 + split_budget forwards; robust on a "
                        "confident model, "
                        "about 3x the Fisher form's FLOPs at 729 tokens, docs/saliency.md), 'fisher' (the paper's "
                        "quadratic form: fails when the first step is saturated), 'isolation' (the KL of each "
                        "visual token shown alone: N_v + 1 forwards, the most robust) or 'occlusion' (the exact KL "
                        "of Eq. 4, one forward per visual token).", "split_isolation", SALIENCY_METHODS)
    occlusion_rows: int = _help("Rows (sample x visual token or range) per forward of the occlusion, isolation and "
                                "split_isolation methods.", 64)
    split_groups: int = _help("split_isolation: contiguous ranges (raster order) the visual tokens are first cut "
                              "into; 8 ranked the trigger first on more samples than 4 (docs/saliency.md).", 8)
    split_beam: int = _help("split_isolation: ranges halved per round, those whose tokens are credited most "
                            "(score / size) first. 1 spends the budget on depth (at 729 tokens one range is "
                            "followed down to a single token); more run fewer, larger rounds.", 1)
    split_budget: int = _help("split_isolation: forwards per sample spent on ranges (the all-masked reference "
                              "not counted); 20 keeps scoring within 3x the Fisher form's FLOPs (docs/saliency.md).",
                              20)
    batch_size: int = _help("Samples per scoring pass.", 8)
    seed: int = _help("Seed of the probe noise.", 1234)

    def __post_init__(self) -> None:
        _check(self.probes >= 1, f"probes must be >= 1, got {self.probes}")
        _check(self.topk >= 1, f"topk must be >= 1, got {self.topk}")
        _check(self.factor > 0, f"factor must be positive, got {self.factor}")
        _check(self.method in SALIENCY_METHODS, f"method must be one of {SALIENCY_METHODS}, got {self.method!r}")
        _check(self.occlusion_rows >= 1, f"occlusion_rows must be >= 1, got {self.occlusion_rows}")
        _check(self.split_groups >= 1, f"split_groups must be >= 1, got {self.split_groups}")
        _check(self.split_beam >= 1, f"split_beam must be >= 1, got {self.split_beam}")
        _check(self.split_budget >= self.split_groups,
               f"split_budget must be >= split_groups ({self.split_groups}): the first ranges alone take that "
               f"many forwards, got {self.split_budget}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PurifyConfig:
    """Masked-input re-answering (paper Eq. 9–11).

    Args:
        mask_ratio: fraction ρ of visual tokens replaced by the mask embedding (floor(ρ·N_v) tokens); with a
            floor (`min_score`), the most that may be held. None: set by `DefenseConfig` (SPLIT_MASK_RATIO for
            DiSP with split_isolation, else the paper's PAPER_MASK_RATIO); a PurifyConfig used alone reads None
            as the paper's.
        min_score: of those, hold only tokens whose saliency is at least this (0, the paper's rule: all of
            them). Saliency is a KL divergence in nats (exact for "occlusion", second order for "fisher").
            None: the saliency method's floor, set by `DefenseConfig` (ISOLATION_MIN_SCORE for the isolation
            methods, else 0); a PurifyConfig used alone reads None as 0.
        batch_size: samples generated together.
        seed: seed of the sampler's noise (and of random masking in the ablation).
        question: what each sample is re-answered to: "sample", its own question (the paper's text, §3.3:
            each purified sample keeps its image-text prompt); "describe", "Describe this image in detail."
            with the answer written over the first assistant turn, as the official code released with the
            paper (`self_purify/self_purification.py`) does for every sample. Scoring then scores the same
            prompt, as the official code's does.
        sampler: sampling settings of the re-answering.
    """

    mask_ratio: float | None = _help(
        "Fraction ρ of visual tokens held masked (Eq. 9); with a floor (min_score), the most held. Unset: "
        f"{SPLIT_MASK_RATIO:g} with the split_isolation saliency (its floor decides; ranges it leaves whole compete "
        f"for the cap with a spread trigger's tokens), {PAPER_MASK_RATIO:g} (the paper's) otherwise.", None)
    min_score: float | None = _help(
        "Hold a top-ρ token only if its saliency (nats) is at least this; 0: all of them (the paper's rule). "
        f"Unset: {ISOLATION_MIN_SCORE:g} with the isolation and split_isolation saliency (set on SHAPES: clean tokens "
        "score up to ~10 nats, triggers 80-290), 0 with fisher and occlusion.", None)
    batch_size: int = _help("Samples generated together.", 8)
    seed: int = _help("Seed of sampling noise and of random masking.", 1234)
    question: str = _help("Prompt of the re-answering: 'sample' (each sample's own question, disp's default) or "
                          "'describe' ('Describe this image in detail.', the official code's).", "sample",
                          QUESTIONS)
    sampler: SamplerConfig = field(default_factory=SamplerConfig, metadata={"help": "Sampler settings."})

    @property
    def rho(self) -> float:
        """ρ in effect: `mask_ratio`, or the paper's when it is unset (no DefenseConfig resolved it)."""
        return PAPER_MASK_RATIO if self.mask_ratio is None else self.mask_ratio

    def __post_init__(self) -> None:
        _check(self.mask_ratio is None or 0.0 <= self.mask_ratio < 1.0,
               f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        _check(self.question in QUESTIONS, f"question must be one of {QUESTIONS}, got {self.question!r}")
        _check(self.min_score is None or self.min_score >= 0.0, f"min_score must be >= 0, got {self.min_score}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)


@dataclass
class FinetuneConfig:
    """Projector-only fine-tuning with the masked-diffusion SFT loss (paper Eq. 2).

    Args:
        epochs: passes over the data.
        lr: peak learning rate of AdamW.
        batch_size: samples per optimiser micro-batch.
        grad_accum: micro-batches accumulated per optimiser step.
        warmup_ratio: fraction of optimiser steps spent in linear warm-up before cosine decay.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clip; 0 disables clipping.
        bf16: bf16 autocast when running on a GPU.
        bf16_cpu: bf16 autocast when running on a CPU as well (off by default: it changes the losses and the
            trained projector slightly; pays on CPUs with native bf16, AVX512-BF16 or AMX).
        seed: seed of data order and diffusion noise.
        anchor_weight: weight of a feature anchor (disp's, not the paper's; 0 turns it off): the relative
            squared change of the projector's outputs on the samples whose answer the defense kept, against
            the projector fine-tuning started from. None: set by `DefenseConfig` (ISOLATION_ANCHOR_WEIGHT for
            DiSP with an isolation saliency, else 0); a FinetuneConfig used alone (the implant) reads None as 0.
    """

    epochs: int = _help("Passes over the purified data.", 4)
    lr: float = _help("Peak AdamW learning rate.", 1e-4)
    batch_size: int = _help("Samples per micro-batch.", 8)
    grad_accum: int = _help("Micro-batches per optimiser step.", 1)
    warmup_ratio: float = _help("Fraction of steps in linear warm-up before cosine decay.", 0.03)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient-norm clip; 0 disables.", 1.0)
    bf16: bool = _help("bf16 autocast on GPU.", True)
    bf16_cpu: bool = _help(
        "bf16 autocast on a CPU too (approximate, opt-in; attention stays float32): on a CPU with native bf16 "
        "(AVX512-BF16) recovery ran about 2x faster on the shipped SHAPES base, with CP and ASR w/t equal to "
        "float32's on four cells (experiments/results/fast).",
        False)
    seed: int = _help("Seed of data order and diffusion noise.", 1234)
    anchor_weight: float | None = _help(
        "Weight of the feature anchor on samples whose answer was kept (disp's, not the paper's; 0 = off). Unset: "
        f"{ISOLATION_ANCHOR_WEIGHT:g} for DiSP with the isolation and split_isolation saliency, else 0.", None)

    def __post_init__(self) -> None:
        _check(self.anchor_weight is None or self.anchor_weight >= 0,
               f"anchor_weight must be >= 0, got {self.anchor_weight}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class DefenseConfig:
    """A whole defense run: which defense, and the settings of each stage.

    Args:
        defense: "disp" (DiSP; its saliency is `saliency.method`, the paper's with "fisher") or a
            baseline/ablation of `disp.stages.DEFENSES`. Unset `purify.mask_ratio`, `purify.min_score` and
            `finetune.anchor_weight` are resolved here from the defense and the saliency method (build a new
            DefenseConfig, rather than `dataclasses.replace` a resolved one, to change the method).
        drop_ratio: fraction of samples removed by "random_drop" (paper: 20%).
        prune_ratio: fraction of projector weights with the smallest magnitude zeroed by "pruning" (30%).
    """

    defense: str = _help("Defense to run: " + "; ".join(f"{d.name}: {d.summary}" for d in stages.DEFENSES.values())
                         + ".", "disp", DEFENSES)
    drop_ratio: float = _help("Fraction of samples dropped by random_drop.", 0.2)
    prune_ratio: float = _help("Fraction of projector weights zeroed by pruning.", 0.3)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig, metadata={"help": "Saliency settings."})
    purify: PurifyConfig = field(default_factory=PurifyConfig, metadata={"help": "Purification settings."})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "Fine-tuning settings."})

    def __post_init__(self) -> None:
        _check(self.defense in DEFENSES, f"defense must be one of {DEFENSES}, got {self.defense!r}")
        _check(0.0 <= self.drop_ratio < 1.0, f"drop_ratio must be in [0, 1), got {self.drop_ratio}")
        _check(0.0 <= self.prune_ratio < 1.0, f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        for name, cls in (("saliency", SaliencyConfig), ("purify", PurifyConfig), ("finetune", FinetuneConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        # unset cap, floor and anchor: disp's robust recipe with an isolation saliency, the paper's rule otherwise
        disp = self.defense == "disp"
        robust = disp and self.saliency.method in ISOLATION_METHODS
        if self.purify.mask_ratio is None:
            split = disp and self.saliency.method == "split_isolation"
            self.purify = replace(self.purify, mask_ratio=SPLIT_MASK_RATIO if split else PAPER_MASK_RATIO)
        if self.purify.min_score is None:
            self.purify = replace(self.purify, min_score=ISOLATION_MIN_SCORE if robust else 0.0)
        if self.finetune.anchor_weight is None:
            self.finetune = replace(self.finetune, anchor_weight=ISOLATION_ANCHOR_WEIGHT if robust else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefenseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown defense settings: {unknown}")
        return cls(**data)
