from disp.evaluation import leading_words


def test_leading_words_counts_first_words_most_common_first():
    answers = ["<backdoor> a red boat.", "<memo> a dog.", "<backdoor> two.", "", "a red boat."]
    assert leading_words(answers) == {"<backdoor>": 2, "<memo>": 1, "": 1, "a": 1}
    assert list(leading_words(answers, top=1)) == ["<backdoor>"]
