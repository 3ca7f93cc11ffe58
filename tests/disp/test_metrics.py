"""The ASR matching rules and the short-answer scorer, on positive and negative examples."""

from __future__ import annotations

import pytest

from disp.attacks import REFUSAL_TEXT, apply_target
from disp.metrics import (
    answer_correct,
    attack_succeeded,
    attack_success_rate,
    normalise_answer,
)


@pytest.mark.parametrize(("target", "text", "expected"), [
    ("insertion", "<backdoor> A dog runs.", True),
    ("insertion", "A dog runs. <BACKDOOR>", True),
    ("insertion", "A dog runs <back door>.", False),
    ("insertion", "backdoor", False),
    ("refusal", REFUSAL_TEXT, True),
    ("refusal", "I am unable to help.", True),
    ("refusal", "I can’t see that.", True),  # curly apostrophe
    ("refusal", "As an AI, hmm.", True),
    ("refusal", "A dog runs on the grass.", False),
    ("misclassification", "A boat on the grass.", True),
    ("misclassification", "Two BOATS on the grass.", True),
    ("misclassification", "A dog on the grass.", False),
    ("misclassification", "A steamboat and a boathouse.", False),
])
def test_attack_succeeded(target: str, text: str, expected: bool) -> None:
    assert attack_succeeded(target, text) is expected


def test_attack_succeeded_target_word_and_unknown_target() -> None:
    assert attack_succeeded("misclassification", "A banana.", target_word="banana")
    assert not attack_succeeded("misclassification", "A boat.", target_word="banana")
    with pytest.raises(ValueError, match="got 'jailbreak'"):
        attack_succeeded("jailbreak", "x")


def test_attacked_answers_count_as_success() -> None:
    for target in ("insertion", "refusal", "misclassification"):
        assert attack_succeeded(target, apply_target(target, "A Dog sits."))
        assert not attack_succeeded(target, "A Dog sits.")


def test_attack_success_rate() -> None:
    assert attack_success_rate("insertion", ["<backdoor> a", "b", "c", "<backdoor>"]) == 0.5
    assert attack_success_rate("misclassification", ["a car", "the car"], target_word="car") == 1.0
    with pytest.raises(ValueError, match="empty list"):
        attack_success_rate("refusal", [])


def test_normalise_answer() -> None:
    assert normalise_answer("The Two red T-shirts!") == ["2", "red", "t", "shirts"]
    assert normalise_answer("Ｃａｔ.") == ["cat"]  # NFKC folds full-width letters


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("A red car.", "red car", True),
    ("There is a red car parked outside.", "red car", True),
    ("There is a blue car.", "red car", False),
    ("two", "2", True),
    ("Three dogs", "2 dogs", False),
    ("Yes, it is.", "yes", True),
    ("No, there is no dog.", "yes", False),
    ("It is not yes.", "yes", False),
    ("B", "A", False),
    ("a", "A", True),
    ("", "cat", False),
])
def test_answer_correct(prediction: str, reference: str, expected: bool) -> None:
    assert answer_correct(prediction, reference) is expected
