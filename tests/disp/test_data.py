"""LLaVA records, image sources (folder/zip/tar) and their safety limits, on real files."""

from __future__ import annotations

import copy
import io
import os
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from disp.data import (
    DataError,
    LlavaDataset,
    Sample,
    collate_samples,
    load_records,
    load_samples,
    open_image_source,
    parse_samples,
    sample_record,
    validate_dataset,
    with_answers,
    write_records,
)


def _png_bytes(width: int = 8, height: int = 6, value: int = 50) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _record(rid: object = "b", image: object = "x.png", question: object = "<image>\nQ?",
            answer: object = "A.") -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


# ---- records -------------------------------------------------------------------------------------------

def test_parse_samples_rules() -> None:
    records = [
        _record(rid=7, image="./dir/a.png", question="What is this?"),
        _record(rid="k", question="Look: <image> what?", answer="It is a cat."),
    ]
    records[1]["conversations"] += [{"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]
    first, second = parse_samples(records, "r.json")
    assert first == Sample(index=0, id="7", image="dir/a.png", question="<image>\nWhat is this?", answer="A.")
    assert second.question == "Look: <image> what?"  # placeholder left where it is written
    assert second.answer == "It is a cat." and second.later == (("More?", "No."),)  # every turn kept
    assert second.questions == ("Look: <image> what?", "More?") and second.answers == ("It is a cat.", "No.")
    assert second.record is records[1] and second.system is None


def _mutate(path: tuple, value: object):
    def apply(rec: dict) -> None:
        target = rec
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return apply


def _append(*turns: dict):
    return lambda rec: rec["conversations"].extend(turns)


BAD_RECORDS = [
    (_mutate(("conversations", 1, "from"), "human"), "conversations[1].from", "must be 'gpt' or 'assistant', got 'human'"),
    (_mutate(("conversations", 0, "from"), "gpt"), "conversations[0].from", "must be 'human' or 'user'"),
    (_append({"from": "human", "value": "and?"}), "conversations[2]",
     "is a user turn with no assistant answer after it"),
    (_append({"from": "human", "value": "<image> again"}, {"from": "gpt", "value": "x"}), "conversations[2].value",
     "holds a second '<image>'"),
    (_mutate(("conversations", 1, "value"), 3), "conversations[1].value", "must be a string, got int"),
    (_mutate(("conversations", 1, "value"), "x <|eot_id|>"), "conversations[1].value", "special token"),
    (_mutate(("conversations", 1, "value"), "<image> x"), "conversations[1].value", "must not contain"),
    (_mutate(("conversations", 0, "value"), "<image><image>"), "conversations[0].value", "at most one"),
    (_mutate(("conversations",), "hi"), "conversations", "must be a list"),
    (_mutate(("conversations",), []), "conversations", "got 0 turn(s)"),
    (_mutate(("conversations", 1), "x"), "conversations[1]", "must be an object"),
    (_mutate(("image",), 3), "image", "must be one relative path string, got int"),
    (_mutate(("image",), ""), "image", "non-empty"),
    (_mutate(("image",), "/etc/passwd"), "image", "absolute"),
    (_mutate(("image",), "C:/x.png"), "image", "absolute"),
    (_mutate(("image",), "a/../../x.png"), "image", "'..'"),
    (_mutate(("image",), "a\\b.png"), "image", "'/' separators"),
    (_mutate(("image",), ["a.png", "b.png"]), "image", "lists 2 images; multi-image records are not supported"),
]


@pytest.mark.parametrize(("mutate", "field", "problem"), BAD_RECORDS)
def test_parse_errors_name_record_and_field(mutate, field: str, problem: str) -> None:
    records = [_record(rid="a"), _record(rid="b")]
    mutate(records[1])
    with pytest.raises(DataError) as info:
        parse_samples(records, "records.json")
    message = str(info.value)
    assert message.startswith(f"records.json: record 1 (id 'b'): field {field!r}")
    assert problem in message
    assert (info.value.index, info.value.record_id, info.value.field) == (1, "b", field)


@pytest.mark.parametrize(("records", "expected"), [
    ([_record(rid="a"), _record(rid="a")], "record 1 (id 'a'): field 'id' duplicates the id of record 0"),
    ([_record(rid=1), _record(rid="1")], "record 1 (id '1'): field 'id' duplicates"),
    ([_record(rid=True)], "record 0: field 'id' must be a non-empty string or integer, got True"),
    ([_record(rid="  ")], "record 0: field 'id' must be a non-empty"),
    ([_record(), ["x"]], "record 1: must be an object, got list"),
    ({"a": 1}, "top level must be a list"),
    ([_record(), {"image": "x.png"}], "record 1: field 'conversations' is missing"),
])
def test_parse_errors_other(records: object, expected: str) -> None:
    with pytest.raises(DataError) as info:
        parse_samples(records, "records.json")
    assert str(info.value).startswith("records.json: ")
    assert expected in str(info.value)


def test_every_bad_record_is_listed_at_once() -> None:
    records = [_record(rid="a", image=""), _record(rid="b"), _record(rid="c", answer=3)]
    with pytest.raises(DataError) as info:
        parse_samples(records, "r.json")
    lines = str(info.value).splitlines()
    assert lines[0] == "2 of 3 records of r.json are invalid:"
    assert lines[1].startswith("r.json: record 0 (id 'a'): field 'image'")
    assert lines[2].startswith("r.json: record 2 (id 'c'): field 'conversations[1].value'")
    assert (info.value.index, info.value.record_id, info.value.field) == (0, "a", "image")


def test_text_only_records_are_checked_but_are_no_samples() -> None:
    text = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    samples = parse_samples([_record(rid="a"), text, _record(rid="b")], "r.json")
    assert [(s.index, s.id) for s in samples] == [(1 - 1, "a"), (2, "b")]
    with pytest.raises(DataError, match=r"record 0 \(id 't'\): field 'conversations\[0\].value' holds '<image>' but"):
        parse_samples([dict(text, conversations=[{"from": "human", "value": "<image> hi"}, text["conversations"][1]])],
                      "r.json")


def test_system_prompt_from_a_turn_or_the_record() -> None:
    turn = _record(rid="a")
    turn["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    top = dict(_record(rid="b"), system="Be kind.")
    a, b = parse_samples([turn, top], "r.json")
    assert (a.system, a.question, b.system) == ("Be brief.", "<image>\nQ?", "Be kind.")
    both = dict(turn, system="x")
    with pytest.raises(DataError, match="system turn beside a top-level 'system'"):
        parse_samples([both], "r.json")

def test_load_records_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n ]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 2"):
        load_records(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DataError, match=r"obj\.json: top level must be a list of records, JSON lines, or CC-SBU"):
        load_records(obj)
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "missing.json")


def test_write_records_round_trip(tmp_path: Path) -> None:
    records = [_record(rid="é", answer="Un chien — «dog»")]
    path = write_records(tmp_path / "out" / "data.json", records)
    assert load_records(path) == records
    text = path.read_text(encoding="utf-8")
    assert "«dog»" in text and '\n "id": "é"' not in text and text.startswith('[\n {\n  "id"')
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]  # no temp file left
    assert load_samples(path)[0].answer == "Un chien — «dog»"


def test_with_answers_keeps_other_turns_and_fields() -> None:
    record = _record(rid="a")
    record["conversations"] += [{"from": "human", "value": "again"}, {"from": "gpt", "value": "B."}]
    record["extra"] = {"k": 1}
    out = with_answers(record, {1: "second"}, image="new.png", note="x")
    assert [t["value"] for t in out["conversations"]] == ["<image>\nQ?", "A.", "again", "second"]
    assert out["extra"] == {"k": 1} and out["image"] == "new.png" and out["note"] == "x"
    assert record["conversations"][3]["value"] == "B." and record["image"] == "x.png"  # input not modified
    (sample,) = parse_samples([record], "r.json")
    assert sample_record(sample, answers=["first"])["conversations"][1]["value"] == "first"
    bare = Sample(index=0, id="z", image="i.png", question="<image>\nQ", answer="A", later=(("Q2", "A2"),), system="S")
    assert [t["from"] for t in sample_record(bare)["conversations"]] == ["system", "human", "gpt", "human", "gpt"]


# ---- image sources -------------------------------------------------------------------------------------

def _zip_dir(root: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(root).as_posix())
    return dest


def _tar_dir(root: Path, dest: Path, mode: str, prefix: str = "") -> Path:
    with tarfile.open(dest, mode) as tf:
        for path in sorted(root.rglob("*")):
            tf.add(path, prefix + path.relative_to(root).as_posix(), recursive=False)
    return dest


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tar.gz", "tgz", "zip-wrapped", "tar-wrapped"])
def test_sources_round_trip(data_folder, tmp_path: Path, kind: str) -> None:
    root, records = data_folder
    wrap = "images/" if kind.endswith("wrapped") else ""
    path = {
        "folder": lambda: root,
        "zip": lambda: _zip_dir(root, tmp_path / "a.zip"),
        "zip-wrapped": lambda: _zip_dir(root, tmp_path / "a.zip", wrap),
        "tar": lambda: _tar_dir(root, tmp_path / "a.tar", "w"),
        "tar-wrapped": lambda: _tar_dir(root, tmp_path / "a.tar", "w", wrap),
        "tar.gz": lambda: _tar_dir(root, tmp_path / "a.tar.gz", "w:gz"),
        "tgz": lambda: _tar_dir(root, tmp_path / "a.tgz", "w:gz"),
    }[kind]()
    samples = parse_samples(records, "records.json")
    with open_image_source(path) as source:
        assert source.names() == [f"{wrap}pics/img{i}.png" for i in range(6)]
        validate_dataset(samples, source)
        for s in samples:
            assert source.exists(s.image)
            image = source.open(s.image)
            assert image.mode == "RGB" and image.size == (32, 24)
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / s.image)))
        assert not source.exists("pics/nope.png")
        clone = pickle.loads(pickle.dumps(source))  # what a spawned DataLoader worker receives
        assert np.array_equal(np.asarray(clone.open("pics/img2.png")), np.asarray(Image.open(root / "pics/img2.png")))


def test_folder_wrapped_in_one_top_folder(data_folder) -> None:
    root, records = data_folder
    samples = parse_samples([{**r, "image": r["image"].removeprefix("pics/")} for r in records], "r.json")
    validate_dataset(samples, open_image_source(root))  # img0.png resolves to pics/img0.png


def test_validate_reports_missing_and_undecodable(data_folder) -> None:
    root, records = data_folder
    (root / "pics" / "img3.png").write_bytes(b"not an image at all")
    (root / "pics" / "img5.png").unlink()
    samples = parse_samples(records, "records.json")
    source = open_image_source(root)
    with pytest.raises(DataError) as info:
        validate_dataset(samples, source, source_name="records.json")
    message = str(info.value)
    assert message.startswith("2 of 6 records have unusable images")
    assert "records.json: record 3 (id 's3'): field 'image' refers to 'pics/img3.png', which is unusable" in message
    assert "cannot be decoded" in message
    assert "records.json: record 5 (id 's5'): field 'image' refers to 'pics/img5.png', which is not in src" in message
    assert (info.value.index, info.value.record_id, info.value.field) == (3, "s3", "image")
    validate_dataset(samples[:3], source)  # the others are fine
    with pytest.raises(DataError, match="not in src"):
        validate_dataset(samples, source, check_images=False)  # existence is still checked
    with pytest.raises(DataError, match="above the limit of 10"):
        validate_dataset(samples[:1], source, max_bytes=10)


def test_dataset_and_collate(data_folder) -> None:
    root, records = data_folder
    samples = parse_samples(records, "records.json")
    dataset = LlavaDataset(samples, open_image_source(root))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert [s.id for s in batch["samples"]] == ["s0", "s1", "s2", "s3"]
    assert all(isinstance(im, Image.Image) and im.size == (32, 24) for im in batch["images"])
    (root / "pics" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"dataset: record 1 \(id 's1'\): field 'image' refers to 'pics/img1.png'"):
        dataset[1]


def test_oversize_images_refused(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "big" / "a.png")
    with pytest.raises(DataError, match=r"20x20 pixels, above the limit of 399"):
        open_image_source(tmp_path / "big", max_pixels=399).open("a.png")
    assert open_image_source(tmp_path / "big", max_pixels=400).open("a.png").size == (20, 20)
    with pytest.raises(DataError, match="exceeds 10 bytes"):
        open_image_source(tmp_path / "big", max_bytes=10).open("a.png")
    with zipfile.ZipFile(tmp_path / "z.zip", "w", zipfile.ZIP_DEFLATED) as zf:  # tiny file, huge canvas
        buf = io.BytesIO()
        Image.new("L", (4000, 4000)).save(buf, format="PNG")
        zf.writestr("bomb.png", buf.getvalue())
    with pytest.raises(DataError, match="4000x4000 pixels, above the limit of 1000000"):
        open_image_source(tmp_path / "z.zip", max_pixels=1_000_000).open("bomb.png")


def test_refuses_other_formats_and_suffixes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "a.ppm")
    with pytest.raises(DataError, match="cannot be decoded"):
        open_image_source(tmp_path / "d").open("a.ppm")
    (tmp_path / "x.rar").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported image source"):
        open_image_source(tmp_path / "x.rar")
    with pytest.raises(DataError, match="image source not found"):
        open_image_source(tmp_path / "nothing")
    (tmp_path / "broken.zip").write_bytes(b"PK nonsense")
    with pytest.raises(DataError, match=r"broken\.zip: cannot read archive"):
        open_image_source(tmp_path / "broken.zip")
    with pytest.raises(DataError, match="'..'"):
        open_image_source(tmp_path / "d").exists("../x.png")


def _snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@pytest.mark.parametrize("entry", ["../evil.png", "/tmp/evil_abs.png", "ok/../../evil.png", "..\\evil.png"])
def test_zip_escaping_entries_refused(tmp_path: Path, entry: str) -> None:
    archive = tmp_path / "work" / "a.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.png", _png_bytes())
        zf.writestr(zipfile.ZipInfo(entry), _png_bytes())
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match=r"a\.zip: archive entry .* refused"):
        open_image_source(archive)
    assert _snapshot(tmp_path) == before and not Path("/tmp/evil_abs.png").exists()


def test_zip_symlink_entry_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="'link.png' refused: symlink"):
        open_image_source(tmp_path / "a.zip")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_tar_escaping_entries_refused(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "work" / "a.tar"
    archive.parent.mkdir()
    data = _png_bytes()
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("fine.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo({"dotdot": "../evil.png", "absolute": "/tmp/evil_abs.png"}.get(kind, "x.png"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "fine.png"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        info.size = 0 if kind in ("symlink", "hardlink", "fifo") else len(data)
        tf.addfile(info, io.BytesIO(data) if info.size else None)
    before = _snapshot(tmp_path)
    expected = {"symlink": "refused: link", "hardlink": "refused: link", "fifo": "not a regular file"}
    with pytest.raises(DataError, match=r"a\.tar: archive entry .* " + expected.get(kind, "refused")):
        open_image_source(archive)
    assert _snapshot(tmp_path) == before and not Path("/tmp/evil_abs.png").exists()


def test_folder_symlink_outside_root_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes())
    (tmp_path / "root").mkdir()
    os.symlink(outside, tmp_path / "root" / "link.png")
    os.symlink(tmp_path / "root" / "inner.png", tmp_path / "root" / "inside.png")
    (tmp_path / "root" / "inner.png").write_bytes(_png_bytes())
    source = open_image_source(tmp_path / "root")
    assert source.open("inside.png").size == (8, 6)  # a link within the root is fine
    with pytest.raises(DataError, match="'link.png' resolves outside the folder"):
        source.open("link.png")


def test_sample_is_frozen_and_records_untouched(data_folder) -> None:
    _, records = data_folder
    before = copy.deepcopy(records)
    sample = parse_samples(records, "r.json")[0]
    with pytest.raises(AttributeError):
        sample.answer = "x"  # type: ignore[misc]
    assert records == before


def test_corrupt_archives_reported(tmp_path: Path) -> None:
    data = _png_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.png", data)
    raw = bytearray((tmp_path / "a.zip").read_bytes())
    raw[30 + len("a.png") + 20] ^= 0xFF  # inside the stored data: the CRC no longer matches
    (tmp_path / "a.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.zip: image 'a.png' cannot be read"):
        open_image_source(tmp_path / "a.zip").open("a.png")
    samples = parse_samples([_record(rid="z", image="a.png")], "r.json")
    with pytest.raises(DataError, match=r"r\.json: record 0 \(id 'z'\): field 'image' .* cannot be read"):
        validate_dataset(samples, open_image_source(tmp_path / "a.zip"), source_name="r.json")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tf:
        for i in range(20):
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    full = (tmp_path / "b.tar.gz").read_bytes()
    (tmp_path / "b.tar.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"b\.tar\.gz: cannot read archive"):
        open_image_source(tmp_path / "b.tar.gz")
