import pytest
import torch

from disp.cell import BASE_CHECKPOINT
from disp.models import load
from disp.saliency import first_step_inputs
from experiments.diagnostics import probe


@pytest.fixture(scope="module")
def base():
    return load(BASE_CHECKPOINT).eval()


def test_first_token_margin_is_the_first_denoising_step_per_record(base):
    records = probe.test_records(base, 24, "test", seed=3, tasks=["exists"])
    res = probe.first_token_margin(base, records)
    assert set(res) == {"yes.", "no."} and sum(g["n"] for g in res.values()) == 24
    # one record alone, unpadded, gives the margin its group's mean is built from
    yes, no = base.tokenizer.encode_text("yes.")[0], base.tokenizer.encode_text("no.")[0]
    alone = [r for r in records if probe.answer_of(r) == "no."][:1]
    with torch.no_grad():
        prompt = base.prompt_batch([probe.question_of(alone[0])], [probe.record_image(base, alone[0])])
        embeds, mask = first_step_inputs(base, prompt, 32)
        logp = base.forward_embeds(embeds, mask, logits_from=prompt.embeds.shape[1])[0, 0].float().log_softmax(-1)
    assert probe.first_token_margin(base, alone)["no."]["mean"] == pytest.approx((logp[yes] - logp[no]).item(), abs=1e-4)
    with pytest.raises(ValueError, match="start with the same token"):
        probe.first_token_margin(base, records, "yes.", "yes")


def test_committed_base_answers_exists_without_reading_the_image(base):
    """docs/reproduction.md (eighth session): v2 says "yes" with the same margin whatever the image holds."""
    res = probe.first_token_margin(base, probe.test_records(base, 60, "test", seed=4, tasks=["exists"]))
    assert res["yes."]["mean"] > 0 and res["no."]["mean"] > 0
    assert abs(res["yes."]["mean"] - res["no."]["mean"]) < 0.1, res


def test_committed_v3_base_answers_every_look_up_and_reads_the_image_for_exists():
    """docs/reproduction.md (eighth session): v3 answers 99.9 % of 800 test records (every task 100 % but
    "at", 98.9 %) and its exists margin has the sign of the reference answer."""
    from experiments import BASE_V3_CHECKPOINT
    from experiments.reproduce import ReproduceConfig

    v3 = load(BASE_V3_CHECKPOINT).eval()
    looks = ["colour", "where", "which", "exists"]
    res = probe.accuracy_by_task(v3, probe.test_records(v3, 48, "test", seed=6, tasks=looks),
                                 sampler=ReproduceConfig().sampler)
    assert set(res["per_task"]) == set(looks) and min(res["per_task"].values()) >= 0.9, res["per_task"]
    margin = probe.first_token_margin(v3, probe.test_records(v3, 40, "test", seed=7, tasks=["exists"]))
    assert margin["yes."]["mean"] > 2 and margin["no."]["mean"] < -2, margin
    recipe = v3.config["disp_pretrain"]
    assert recipe["continued_from"]["continued_from"]["continued_from"]["vision_position_labels"] is True
