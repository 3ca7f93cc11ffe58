"""Batches for the dataset-level stages: length buckets, images decoded ahead, and the vision-feature cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from disp.data import DataError, ImageSource, Sample, open_sample_image
from disp.models.base import MDLM, ImageFeatures, ImageViews


class VisionCache:
    """Vision-tower outputs by image name, kept on the CPU, so each distinct image goes through the tower
    once however many samples and stages use it. Features are those of the tower, before the projector
    (which fine-tuning changes), so scoring, purification and fine-tuning can all share them. An anyres
    image holds one entry per view ([n_views, N_view, C_v], 5 views of 729 x 1152 at 2 x 2 crops: 8.4 MB in
    bf16), with the image's size for the merge."""

    def __init__(self) -> None:
        self.features: dict[str, ImageFeatures] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.features

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def add(self, model: MDLM, names: Sequence[str], views: Sequence[ImageViews] | None) -> None:
        """Run the tower on the views of images `names` (those not cached yet)."""
        if names:
            feats = model.tower(views)
            self.features.update((n, ImageFeatures(f.features.detach().cpu(), f.size))
                                 for n, f in zip(names, feats, strict=True))

    def fill(self, model: MDLM, names: Sequence[str], source: ImageSource, batch_size: int = 32, *,
             samples: Sequence[Sample] = ()) -> None:
        """Run the tower on the images among `names` that are not cached yet, `batch_size` images at a time.
        An unusable image's error names the first of `samples` that uses it."""
        owner = {s.image: s for s in reversed(samples)}
        todo = list(dict.fromkeys(n for n in names if n not in self))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            self.add(model, chunk, model.image_views([open_sample_image(source, owner[n]) if n in owner
                                                      else source.open(n) for n in chunk]))

    def lookup(self, names: Sequence[str]) -> list[ImageFeatures]:
        """Tower outputs of cached images, on the CPU."""
        return [self.features[n] for n in names]

    def embeds(self, model: MDLM, names: Sequence[str]) -> list[torch.Tensor]:
        """Each cached image's visual tokens [N_b, D], on the model's device."""
        with torch.no_grad():
            return model.visual_tokens(self.lookup(names))


def length_buckets(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Sample positions in batches of `size`, ordered by prompt length (text and visual tokens) so a batch
    carries little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def visual_counts(model: MDLM, samples: Sequence[Sample], source: ImageSource) -> list[int]:
    """Visual tokens of each sample's image, from the image's size (read from its header) and the model's
    layout; without a tower pass, and without opening any image when the layout is one view."""
    if model.num_image_tokens is not None:
        return [model.num_image_tokens] * len(samples)
    sizes: dict[str, int] = {}
    for s in samples:
        if s.image not in sizes:
            try:
                size = source.image_size(s.image)
            except DataError:
                open_sample_image(source, s)  # raises the error naming the record
                raise
            sizes[s.image] = model.visual_token_count(size)
    return [sizes[s.image] for s in samples]


def loaded_batches(model: MDLM, samples: list[Sample], source: ImageSource, batches: list[list[int]],
                    cache: VisionCache) -> Iterator[list[int]]:
    """Yield each batch once the tower outputs of its images are in `cache`. The next batch's images are
    decoded and preprocessed on a background thread while the caller works on the current batch."""

    def load(batch: list[int]) -> tuple[list[str], list[ImageViews]]:
        first = {samples[i].image: samples[i] for i in reversed(batch) if samples[i].image not in cache}
        names = list(dict.fromkeys(samples[i].image for i in batch if samples[i].image in first))
        return names, model.image_views([open_sample_image(source, first[n]) for n in names])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="disp-images") as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            names, pixels = pending.result()
            cache.add(model, names, pixels)
            pending = pool.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield batch
