"""Measuring a stage: peak memory (CUDA allocator or sampled RSS), model FLOPs and the device."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

from disp.models.base import MDLM
from experiments.environment import cpu_name

# Dense bf16 tensor-core peaks (FLOP/s) by device name, for model-FLOPs utilisation.
GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


# -- measurement ----------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the high-water mark so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StagePeaks:
    """Peak memory per stage: CUDA `max_memory_allocated`, else the process RSS sampled every 5 ms.

    `switch(stage)` starts attributing to `stage` (the reference alternates stages per sample)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, int] = {}
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            stage = self.current
            if stage is not None:
                self.peaks[stage] = max(self.peaks.get(stage, 0), _rss_bytes())

    def switch(self, stage: str | None) -> None:
        if self.cuda:
            if self.current is not None:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif stage is not None:
            self.peaks[stage] = max(self.peaks.get(stage, 0), _rss_bytes())
        self.current = stage

    def __enter__(self) -> StagePeaks:
        if not self.cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.switch(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class FlopCounter:
    """Model FLOPs of LM forwards/backwards and vision-tower forwards, counted by wrapping the model's calls.

    LM forward: 2·tokens·(matmul parameters incl. lm_head) + 4·B·L²·D·layers (scores and values).
    Cached forward (`forward_cached`, G answer tokens against P cached prompt keys/values):
    2·B·G·(matmul parameters) + 4·B·G·(P + G)·D·layers.
    Backward to the inputs only (scoring probes; fine-tuning, whose only trainable weights are the
    projector's): the same matmul FLOPs and twice the attention FLOPs. Each forward taken with grad
    enabled is charged `backwards_per_grad_forward` backward passes (M probes when scoring, 1 when training).
    """

    def __init__(self, model: MDLM):
        self.model = model
        lm = model.lm_config
        hd = lm.hidden_size // lm.num_attention_heads
        self.lm_matmul = (
            lm.num_hidden_layers
            * (
                2 * lm.hidden_size * lm.hidden_size
                + 2 * lm.hidden_size * lm.num_key_value_heads * hd
                + 3 * lm.hidden_size * lm.intermediate_size
            )
            + lm.hidden_size * lm.vocab_size
        )
        self.lm_attn = 4 * lm.hidden_size * lm.num_hidden_layers
        vt = model.model.vision_tower.vision_tower
        vc = vt.vision_model.config
        n_v = (vc.image_size // vc.patch_size) ** 2
        proj = sum(p.numel() for n, p in model.projector.named_parameters() if n.endswith("weight"))
        self.per_image = (
            2
            * n_v
            * (
                vt.used_layers * (4 * vc.hidden_size**2 + 2 * vc.hidden_size * vc.intermediate_size)
                + 3 * vc.patch_size**2 * vc.hidden_size
                + proj
            )
            + 4 * n_v**2 * vc.hidden_size * vt.used_layers
        )
        self.backwards_per_grad_forward = 0
        self.flops = 0.0

    def _lm(self, B: int, L: int) -> tuple[float, float]:
        return 2.0 * B * L * self.lm_matmul, float(self.lm_attn) * B * L * L

    @contextmanager
    def counting(self):
        model = self.model
        fwd, vis = model.forward_embeds, model.vision_features

        def forward_embeds(embeds, attention_mask=None, **kw):
            mm, attn = self._lm(embeds.shape[0], embeds.shape[1])  # counted as a full forward (an upper bound)
            self.flops += mm + attn
            if torch.is_grad_enabled() and embeds.requires_grad:
                self.flops += self.backwards_per_grad_forward * (mm + 2 * attn)
            return fwd(embeds, attention_mask, **kw)

        def vision_features(pixels):
            self.flops += self.per_image * pixels.shape[0]
            return vis(pixels)

        cached = getattr(model, "forward_cached", None)

        def forward_cached(embeds, cache):
            B, G = embeds.shape[:2]
            self.flops += 2.0 * B * G * self.lm_matmul + float(self.lm_attn) * B * G * (
                cache.attention_mask.shape[1] + G)
            return cached(embeds, cache)

        model.forward_embeds, model.vision_features = forward_embeds, vision_features
        if cached is not None:
            model.forward_cached = forward_cached
        try:
            yield self
        finally:
            del model.forward_embeds, model.vision_features  # back to the class's methods
            if cached is not None:
                del model.forward_cached

    def take(self) -> float:
        out, self.flops = self.flops, 0.0
        return out


def gpu_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16 if key in name), None)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
