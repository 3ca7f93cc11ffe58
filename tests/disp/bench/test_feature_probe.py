import pytest
import torch

from disp.bench import pretrain as pt
from disp.bench import shapes
from disp.bench.feature_probe import linear_probe, main, position_report

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vision_hidden_size": 16,
        "vision_intermediate_size": 32, "vision_layers": 2, "vision_heads": 2, "batch_size": 8, "steps": 1,
        "warmup": 1, "tasks": ("count",), "threads": 1, "device": "cpu", "grid": 2, "style": "tile",
        "min_objects": 2, "vision_steps": 80, "vision_lr": 1e-2}


def test_linear_probe_reads_separable_labels_and_not_random_ones():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    x = torch.nn.functional.one_hot(y, 5).float() + 0.1 * torch.randn(400, 5, generator=g)
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], classes=5) == 1.0
    noise = torch.randn(400, 5, generator=g)
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], classes=5) < 0.4  # chance 0.2
    with pytest.raises(ValueError, match="differ in length: 300 vs 299"):
        linear_probe(x[:300], y[:299], x[300:], y[300:], classes=5)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {labels: pt.pretrain(pt.PretrainConfig(**TINY, vision_position_labels=labels), root / str(labels))
            for labels in (False, True)}


def test_position_labels_put_the_token_index_into_the_tower_features(towers):
    reports = {}
    for labels, path in towers.items():
        model = pt.load_base(path).eval()
        reports[labels] = position_report(model, shapes.config_of_checkpoint(path), n_train=60, n_test=30)
    with_pos, without = reports[True]["probes"], reports[False]["probes"]
    assert set(with_pos) == {"tower/cell", "tower/token_index", "projector/cell", "projector/token_index"}
    assert with_pos["tower/token_index"]["chance"] == pytest.approx(1 / 36)
    assert with_pos["tower/cell"]["chance"] == pytest.approx(1 / 4)
    # measured: 0.80 with the labels, 0.14 without (80 stage-0 steps of a 16-wide tower)
    assert with_pos["tower/token_index"]["accuracy"] > without["tower/token_index"]["accuracy"] + 0.4


def test_cli_writes_the_report_and_rejects_a_folder_without_a_checkpoint(towers, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main([str(towers[True]), "--n-train", "20", "--n-test", "10", "--json", str(out)]) == 0
    assert "tower/token_index" in capsys.readouterr().out and out.read_text().count("accuracy") == 4
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err
