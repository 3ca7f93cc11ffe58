import pytest
from PIL import Image

from disp import scenes
from experiments.pretrain import tags


def test_tag_codes_are_distinct_and_cover_their_tokens():
    assert len({tags.tag_code(i) for i in range(len(tags.TAG_WORDS) + 1)}) == len(tags.TAG_WORDS) + 1
    assert tags.tag_tokens((5, 0, 6), 48, 8) == [0, 1]
    assert tags.tag_tokens((8, 8, 8), 48, 8) == [7]


def test_drawn_tag_uses_its_code_and_leaves_the_input_alone():
    blank = Image.new("RGB", (48, 48), scenes.BACKGROUND)
    drawn = tags.draw_tag(blank, 3, 8, 16, 8)
    code = tags.tag_code(3)
    assert [drawn.getpixel((8 + dx, 16 + dy)) for dy in (0, 4) for dx in (0, 4)] == [tags.TAG_PALETTE[c] for c in code]
    assert blank.getpixel((8, 16)) == scenes.BACKGROUND
    assert tags.content_tokens(drawn, 8) == (13,) and tags.content_tokens(blank, 8) == ()


def test_blended_tag_lies_between_its_two_codes():
    a, b = tags.tag_colours(0), tags.tag_colours(5)
    assert tags.tag_colours(0, 5, 0.0) == a and tags.tag_colours(0, 5, 1.0) == b
    mid = tags.tag_colours(0, 5, 0.25)
    for ca, cb, cm in zip(a, b, mid, strict=True):
        assert all(min(u, v) <= m <= max(u, v) and abs(m - (0.75 * u + 0.25 * v)) <= 0.5
                   for u, v, m in zip(ca, cb, cm, strict=True))
    blank = Image.new("RGB", (48, 48), scenes.BACKGROUND)
    assert tags.draw_tag(blank, 0, 8, 8, 8, other=5, alpha=0.25).getpixel((8, 8)) == mid[0]
    with pytest.raises(ValueError, match="1.5"):
        tags.tag_colours(0, 5, 1.5)
