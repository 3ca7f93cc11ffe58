"""Every dataset format through the one loader (`disp.formats`), on real files the tests write."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disp.data import DataError, open_sample_image, parse_samples, write_records
from disp.formats import FormatError, open_dataset, open_images, read_dataset
from disp.records import CC_SBU_PROMPT

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def png(value: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def llava(rid, image="img0.png", turns=("Q?", "A.")) -> dict:
    roles = ["human", "gpt"] * len(turns)
    rec = {"id": rid, "conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=False)]}
    return rec if image is None else {**rec, "image": image}


FOUR_TURNS = llava("multi", turns=("<image>\nWhat is it?", "A dog.", "What colour?", "Brown."))
TEXT_ONLY = llava("text", image=None, turns=("Say hi.", "Hi."))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"img{i}.png").write_bytes(png(40 * i))
    return root


def samples_of(ds) -> list[tuple]:
    return [(s.id, s.image, s.questions, s.answers, s.system) for s in ds.samples]


def round_trip(ds, tmp_path: Path, images: Path) -> None:
    """Write the canonical records as LLaVA JSON and read them back: the same samples and text-only records."""
    again = open_dataset(write_records(tmp_path / "rt" / "data.json", ds.records), images=images)
    assert samples_of(again) == samples_of(ds) and again.text_only == ds.text_only


def test_llava_json_with_every_turn_text_only_and_a_system_prompt(folder, tmp_path):
    system = {**llava("sys", image="images/img1.png"), "system": "Be brief."}
    (folder / "data.json").write_text(json.dumps([FOUR_TURNS | {"image": "images/img0.png"}, TEXT_ONLY, system]))
    ds = open_dataset(folder)
    assert (ds.format, ds.parsed.shapes, ds.text_only) == ("json", ["llava", "llava", "sharegpt"], [1])
    assert samples_of(ds) == [
        ("multi", "images/img0.png", ("<image>\nWhat is it?", "What colour?"), ("A dog.", "Brown."), None),
        ("sys", "images/img1.png", ("<image>\nQ?",), ("A.",), "Be brief.")]
    assert ds.records[1] == TEXT_ONLY  # kept as it is
    round_trip(ds, tmp_path, folder)


def test_jsonl_and_json_lines_in_a_json_file(folder):
    lines = "\n".join(json.dumps(r) for r in [llava(0, "images/img0.png"), TEXT_ONLY]) + "\n\n"
    (folder / "data.jsonl").write_text(lines)
    assert open_dataset(folder / "data.jsonl").format == "jsonl"
    (folder / "data.jsonl").rename(folder / "data.json")  # the "invalid JSON at line 2"
    ds = open_dataset(folder / "data.json")
    assert ds.format == "jsonl" and [s.id for s in ds.samples] == ["0"] and ds.text_only == [1]
    (folder / "data.json").write_text(lines.replace("}\n{", "}\n{oops", 1))
    with pytest.raises(FormatError, match=r"data\.json: invalid JSON at line 2 \(record 1\) column 2"):
        open_dataset(folder / "data.json")


def test_cc_sbu_align_folder_and_archive(tmp_path):
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    for i in (2, 7):
        (root / "image" / f"{i}.jpg").write_bytes(png(30 * i, "JPEG"))
    caps = {"annotations": [{"image_id": "2", "caption": "A red kite."}, {"image_id": 7, "caption": "Two boats."}]}
    (root / "filter_cap.json").write_text(json.dumps(caps))
    ds = open_dataset(root)
    assert ds.format == "cc-sbu-align"
    assert samples_of(ds) == [("2", "image/2.jpg", (f"<image>\n{CC_SBU_PROMPT}",), ("A red kite.",), None),
                              ("7", "image/7.jpg", (f"<image>\n{CC_SBU_PROMPT}",), ("Two boats.",), None)]
    archive = tmp_path / "cc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, p.relative_to(tmp_path).as_posix())  # cc_sbu_align/filter_cap.json, cc_sbu_align/image/...
    assert samples_of(open_dataset(archive)) == samples_of(ds)
    assert open_dataset(archive).source.open("image/7.jpg").size == (16, 12)


def test_openai_messages_with_content_parts(folder, tmp_path):
    records = [
        {"id": "m", "messages": [
            {"role": "system", "content": "You see images."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/img2.png"}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]},
                      {"role": "assistant", "content": "Grey."}], "images": ["images/img1.png"]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]},
    ]
    (folder / "data.json").write_text(json.dumps(records))
    ds = open_dataset(folder)
    assert ds.parsed.shapes == ["openai-messages"] * 3 and ds.text_only == [2]
    assert samples_of(ds) == [
        ("m", "images/img2.png", ("<image>\nWhat is it?", "Sure?"), ("A square.", "Yes."), "You see images."),
        ("1", "images/img1.png", ("Look\n<image>",), ("Grey.",), None)]
    assert ds.records[2] == {"id": 2, "conversations": [{"from": "human", "value": "Hello"},
                                                        {"from": "gpt", "value": "Hi"}]}
    round_trip(ds, tmp_path, folder)


def test_sharegpt_roles_and_a_list_of_one_image(folder):
    rec = {"id": "s", "image": ["images/img0.png"], "conversations": [
        {"from": "system", "value": "Sys."}, {"from": "user", "value": "Q?"}, {"from": "assistant", "value": "A."}]}
    (folder / "data.json").write_text(json.dumps([rec]))
    ds = open_dataset(folder)
    assert ds.parsed.shapes == ["sharegpt"]
    assert samples_of(ds) == [("s", "images/img0.png", ("<image>\nQ?",), ("A.",), "Sys.")]


@pytest.mark.parametrize(("record", "field", "words"), [
    (llava("two", image=["a.png", "b.png"]), "image", "lists 2 images; multi-image records are not supported"),
    ({"id": "p", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "a.png"}, {"type": "image_url", "image_url": "b.png"}]},
        {"role": "assistant", "content": "x"}]}, "messages", "holds 2 images; multi-image"),
    ({"id": "d", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
                              {"role": "assistant", "content": "x"}]}, "messages[0].content[0]", "data: URL"),
    ({"id": "h", "messages": [{"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]},
                              {"role": "assistant", "content": "x"}]}, "messages[0].content[0]", "remote URL"),
    ({"id": "t", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "got 'tool'"),
])
def test_refused_records_are_named_with_the_reason(record, field, words):
    with pytest.raises(DataError) as info:
        parse_samples([llava("ok"), record], "d.json")
    assert (info.value.index, info.value.field) == (1, field) and words in str(info.value)
    assert str(info.value).startswith("d.json: record 1 (id ")


def write_arrow_rows(ds_rows: list[dict], images: list[bytes | None]) -> pa.Table:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {k: [r.get(k) for r in ds_rows] for k in ds_rows[0]}
    cols["conversations"] = [json.loads(json.dumps(r["conversations"])) for r in ds_rows]
    table = pa.table(cols)
    structs = [None if b is None else {"bytes": b, "path": f"orig{i}.png"} for i, b in enumerate(images)]
    return table.append_column("image", pa.array(structs, type=image_type))


def test_parquet_with_image_bytes(tmp_path):
    rows = [{"id": "a", "conversations": FOUR_TURNS["conversations"]},
            {"id": "b", "conversations": TEXT_ONLY["conversations"]}]
    pq.write_table(write_arrow_rows(rows, [png(99), None]), tmp_path / "train.parquet")
    ds = open_dataset(tmp_path / "train.parquet")
    assert (ds.format, ds.text_only, [s.image for s in ds.samples]) == ("parquet", [1], ["row-000000.png"])
    assert ds.samples[0].answers == ("A dog.", "Brown.")
    assert np.asarray(ds.source.open("row-000000.png"))[0, 0].tolist() == [99, 99, 99]
    # the purified set names the same images, found again through the parquet file
    out = write_records(tmp_path / "purified.json", ds.records)
    again = open_dataset(out, images=tmp_path / "train.parquet")
    assert again.source.open(again.samples[0].image).size == (16, 12)


def test_hugging_face_save_to_disk_folder_and_dataset_dict(tmp_path):
    rows = [{"id": f"r{i}", "conversations": llava(i)["conversations"]} for i in range(3)]
    table = write_arrow_rows(rows, [png(10), png(20), png(30)])
    split = tmp_path / "hf" / "train"
    split.mkdir(parents=True)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "dataset_info.json").write_text(json.dumps({"features": {"image": {"_type": "Image"}}}))
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    for path in (split, tmp_path / "hf"):
        ds = open_dataset(path)
        assert ds.format == "hf-datasets" and [s.id for s in ds.samples] == ["r0", "r1", "r2"]
        assert np.asarray(ds.source.open(ds.samples[2].image))[0, 0, 0] == 30
    assert open_images(split).open("row-000001.png").size == (16, 12)


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "d.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(FormatError, match=r"need pyarrow.*pip install 'disp\[data\]'") as info:
        read_dataset(tmp_path / "d.parquet")
    assert info.value.code == "missing_extra"


def test_zip_images_found_under_their_folder_or_the_error_says_where(tmp_path):
    archive = tmp_path / "ds.zip"
    records = [llava(0, "0.png"), llava(1, "1.png"), llava(2, "pics/9.png")]
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data.json", json.dumps(records))
        zf.writestr("images/0.png", png(1))
        zf.writestr("images/1.png", png(2))
    ds = read_dataset(archive)
    assert [ds.source.exists(s.image) for s in ds.samples] == [True, True, False]
    with pytest.raises(DataError) as info:
        open_dataset(archive)
    assert "record 2 (id '2'): field 'image' refers to 'pics/9.png', which is not in ds.zip; its 2 image file(s) " \
           "are under 'images/' (e.g. 'images/0.png')" in str(info.value)


def test_undecodable_images_name_record_and_image_and_never_a_python_object(tmp_path):
    good = png(5, "JPEG")
    (tmp_path / "a.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "b.png").write_bytes(b"this is no image")
    (tmp_path / "data.json").write_text(json.dumps([llava("t", "a.jpg"), llava("n", "b.png")]))
    ds = open_dataset(tmp_path)
    messages = []
    for s in ds.samples:
        with pytest.raises(DataError) as info:
            open_sample_image(ds.source, s)
        messages.append(str(info.value))
        assert (info.value.index, info.value.record_id, info.value.field) == (s.index, s.id, "image")
    assert messages[0].startswith("record 0 (id 't'): field 'image' refers to 'a.jpg', which is unusable: ")
    assert "cannot be decoded: Truncated File Read" in messages[0]
    assert messages[1].endswith("image 'b.png' cannot be decoded: not a PNG/JPEG/WEBP/GIF/BMP/TIFF image")
    assert not any("BytesIO" in m or " at 0x" in m for m in messages)


def test_defend_on_a_truncated_jpeg_names_the_record_and_image(tiny_dir, tmp_path):
    from disp.config import DefenseConfig, PurifyConfig, SaliencyConfig, SamplerConfig
    from disp.defend import defend

    good = png(5, "JPEG")
    (tmp_path / "ok.png").write_bytes(png(7))
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "data.json").write_text(json.dumps([llava("fine", "ok.png"), llava("cut", "cut.jpg")]))
    config = DefenseConfig(saliency=SaliencyConfig(method="fisher", batch_size=1), purify=PurifyConfig(sampler=SamplerConfig(4, 4, 4)))
    with pytest.raises(DataError, match=r"record 1 \(id 'cut'\): field 'image' refers to 'cut.jpg', which is "
                                        r"unusable: .*Truncated"):
        defend(model_dir=tiny_dir, data_json=tmp_path / "data.json", images=None, out_dir=tmp_path / "out",
               config=config)


@pytest.mark.parametrize(("files", "code"), [
    ({}, "missing_dataset_file"),
    ({"a.json": "[]", "b.jsonl": ""}, "ambiguous_dataset_file"),
    ({"data.json": '{"rows": []}'}, "malformed_json"),
])
def test_file_level_problems(tmp_path, files, code):
    (tmp_path / "d").mkdir()
    for name, text in files.items():
        (tmp_path / "d" / name).write_text(text)
    with pytest.raises(FormatError) as info:
        read_dataset(tmp_path / "d")
    assert info.value.code == code


def test_empty_and_text_only_datasets_are_refused_for_a_defense(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(FormatError, match="has no records"):
        open_dataset(tmp_path / "e.json")
    (tmp_path / "t.json").write_text(json.dumps([TEXT_ONLY]))
    with pytest.raises(FormatError, match="all 1 records are text-only"):
        open_dataset(tmp_path / "t.json")
