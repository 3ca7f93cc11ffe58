"""Batches for the dataset-level stages: length buckets, images decoded ahead, and the vision-feature cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from disp.data import ImageSource, Sample, open_sample_image
from disp.models.base import MDLM


class VisionCache:
    """Vision-tower outputs by image name, kept on the CPU, so each distinct image goes through the tower
    once however many samples and stages use it. Features are those of the tower, before the projector
    (which fine-tuning changes), so scoring, purification and fine-tuning can all share them."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.features

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def add(self, model: MDLM, names: Sequence[str], pixels: torch.Tensor | None) -> None:
        """Run the tower on pixel values [n, 3, S, S] of images `names` (those not cached yet)."""
        if names:
            feats = model.vision_features(pixels.to(model.device))
            self.features.update(zip(names, feats.detach().cpu(), strict=True))

    def fill(self, model: MDLM, names: Sequence[str], source: ImageSource, batch_size: int = 32, *,
             samples: Sequence[Sample] = ()) -> None:
        """Run the tower on the images among `names` that are not cached yet, `batch_size` at a time.
        An unusable image's error names the first of `samples` that uses it."""
        owner = {s.image: s for s in reversed(samples)}
        todo = list(dict.fromkeys(n for n in names if n not in self))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            self.add(model, chunk, model.processor([open_sample_image(source, owner[n]) if n in owner
                                                    else source.open(n) for n in chunk]))

    def stacked(self, names: Sequence[str]) -> torch.Tensor:
        """Tower outputs [len(names), N_v, C_v] of cached images, on the CPU."""
        return torch.stack([self.features[n] for n in names])

    def embeds(self, model: MDLM, names: Sequence[str]) -> torch.Tensor:
        """Projected visual embeddings [B, N_v, D] of cached images, on the model's device."""
        with torch.no_grad():
            return model.project(torch.stack([self.features[n] for n in names]).to(model.device))


def length_buckets(prompt_ids: list[list[int]], size: int) -> list[list[int]]:
    """Sample positions in batches of `size`, ordered by prompt length so a batch carries little padding."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def loaded_batches(model: MDLM, samples: list[Sample], source: ImageSource, batches: list[list[int]],
                    cache: VisionCache) -> Iterator[list[int]]:
    """Yield each batch once the tower outputs of its images are in `cache`. The next batch's images are
    decoded and preprocessed on a background thread while the caller works on the current batch."""

    def load(batch: list[int]) -> tuple[list[str], torch.Tensor | None]:
        first = {samples[i].image: samples[i] for i in reversed(batch) if samples[i].image not in cache}
        names = list(dict.fromkeys(samples[i].image for i in batch if samples[i].image in first))
        return names, model.processor([open_sample_image(source, first[n]) for n in names]) if names else None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="disp-images") as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            names, pixels = pending.result()
            cache.add(model, names, pixels)
            pending = pool.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield batch
