"""Batches on several CPU threads (`disp.parallel`), and the stages that use them."""

from __future__ import annotations

import threading

import pytest
import torch

from disp import models
from disp.attacks import TriggerConfig, poison_dataset
from disp.config import PurifyConfig, SaliencyConfig, SamplerConfig
from disp.finetune import Cancelled
from disp.parallel import map_ordered, resolve_workers, thread_share
from disp.pipeline import VisionCache, load_dataset, purify_samples, score_samples
from disp.shapes import ShapesConfig, write_dataset

SAMPLER = SamplerConfig(8, 8, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = write_dataset(root / "shapes", ShapesConfig(), sizes={"train": 14}, seed=0)
    samples, source = load_dataset(paths["train"], root / "shapes")
    res = poison_dataset(samples, source, target="insertion", trigger=TriggerConfig(kind="corner", size_frac=0.25),
                         ratio=0.25, seed=0, out_dir=root / "poisoned")
    return load_dataset(res.data_path, res.data_path.parent)


@pytest.fixture
def model(tiny_dir):
    return models.load(tiny_dir)


def test_resolve_workers():
    assert resolve_workers(3, "cpu") == 3
    assert resolve_workers(None, "cpu") == resolve_workers(0, "cpu") == torch.get_num_threads()
    assert resolve_workers(0, "cuda") == 1
    with pytest.raises(ValueError, match="-2"):
        resolve_workers(-2, "cpu")


def test_thread_share_splits_and_restores_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with thread_share(2) as share:
            assert share == 2 and torch.get_num_threads() == 2
        with thread_share(8) as share:
            assert share == 1
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_map_ordered_keeps_order_and_runs_on_worker_threads():
    names = []

    def fn(x):
        names.append(threading.current_thread().name)
        return x * x

    assert list(map_ordered(fn, range(20), 3)) == [(i, i * i) for i in range(20)]
    assert all(n.startswith("disp-worker") for n in names)
    assert list(map_ordered(fn, range(3), 1)) == [(0, 0), (1, 1), (2, 4)]


def test_map_ordered_stops_drawing_items_when_the_consumer_stops():
    drawn = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield i

    it = map_ordered(lambda x: x, items(), 2)
    assert [next(it) for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]
    it.close()
    assert len(drawn) <= 3 + 2 * 2  # at most 2·workers ahead of what was consumed


def test_map_ordered_raises_the_workers_error():
    def fn(x):
        if x == 5:
            raise KeyError("sample 5")
        return x

    with pytest.raises(KeyError, match="sample 5"):
        list(map_ordered(fn, range(10), 2))


def test_scores_and_purified_answers_do_not_depend_on_workers(model, data):
    samples, source = data
    saliency, purify = SaliencyConfig(method="fisher", batch_size=3), PurifyConfig(sampler=SAMPLER, batch_size=3)
    flags = [p.requires_grad for p in model.parameters()]
    threads = torch.get_num_threads()
    runs = {}
    for workers in (1, 3):
        ticks: list[tuple[int, int, str]] = []

        def tick(done, total, ticks=ticks):
            ticks.append((done, total, threading.current_thread().name))

        cache = VisionCache()
        scores = score_samples(model, samples, source, saliency, SAMPLER, cache=cache, workers=workers,
                               on_progress=tick)
        records = purify_samples(model, samples, source, purify, scores, cache=cache, workers=workers)
        runs[workers] = scores, records
        assert [d for d, _, _ in ticks] == sorted(d for d, _, _ in ticks)
        assert ticks[-1][:2] == (len(samples), len(samples))
        assert {name for _, _, name in ticks} == {threading.current_thread().name}  # progress in the caller's thread
    assert runs[1][0] == runs[3][0]  # bit-identical scores
    assert runs[1][1] == runs[3][1]
    assert [p.requires_grad for p in model.parameters()] == flags  # restored once, not per thread
    assert torch.get_num_threads() == threads


def test_cancel_with_workers(model, data):
    samples, source = data
    with pytest.raises(Cancelled):
        score_samples(model, samples, source, SaliencyConfig(method="fisher", batch_size=2), SAMPLER, workers=2,
                      should_stop=lambda: True)
    assert all(p.requires_grad for p in model.parameters())
