"""`disp data check`: the report on real files, as text and JSON, through the command line."""

from __future__ import annotations

import io
import json
import zipfile

from PIL import Image

from disp.cli import main
from disp.datacheck import check_dataset


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


RECORDS = [
    {"id": "a", "image": "0.png", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"id": "c", "image": "1.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "B"}]},
]


def write_zip(path, records, images):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data.jsonl", "\n".join(json.dumps(r) for r in records))
        for name, data in images.items():
            zf.writestr(name, data)
    return path


def test_a_clean_dataset_is_described(tmp_path, capsys):
    archive = write_zip(tmp_path / "ds.zip", RECORDS, {"images/0.png": png(1), "images/1.png": png(2)})
    assert main(["data", "check", str(archive)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines() == [
        f"{archive}: jsonl (data.jsonl)",
        "  records      3 (1 llava, 1 openai-messages, 1 sharegpt)",
        "  with image   2 (scored, purified, trained on)",
        "  text-only    1 (kept in every output as they are, never scored)",
        "  turns        8 in all; 1 multi-turn record(s); 1 with a system prompt",
        "  images       2 distinct, 2 found and decoded (from ds.zip)",
        "  no problems",
    ]
    assert main(["data", "check", str(archive), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["record_formats"] == {"sharegpt": 1, "openai-messages": 1, "llava": 1}
    assert (report["records"], report["samples"], report["text_only"], report["images"]) == (3, 2, 1, 2)


def test_every_problem_is_listed_with_record_and_field(tmp_path, capsys):
    bad = [*RECORDS, {"id": "d", "image": ["x.png", "y.png"], "conversations": RECORDS[2]["conversations"]},
           {"id": "e", "image": "2.png", "conversations": [{"from": "gpt", "value": "no question"}]}]
    archive = write_zip(tmp_path / "bad.zip", bad, {"images/0.png": b"broken", "images/2.png": png(3)})
    assert main(["data", "check", str(archive), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems_total"] == 4
    where = [(p["index"], p["id"], p["field"]) for p in report["problems"]]
    assert where == [(0, "a", "image"), (2, "c", "image"), (3, "d", "image"), (4, "e", "conversations[0].from")]
    messages = [p["message"] for p in report["problems"]]
    assert "cannot be decoded: not a PNG/JPEG/WEBP/GIF/BMP/TIFF image" in messages[0]
    assert "which is not in bad.zip; its 2 image file(s) are under 'images/'" in messages[1]
    assert "multi-image records are not supported" in messages[2]
    assert main(["data", "check", str(archive)]) == 1
    assert "4 problem(s):\n    data.jsonl: record 0 (id 'a'): field 'image'" in capsys.readouterr().out


def test_unreadable_input_is_a_report_not_a_traceback(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"rows": 1}')
    assert main(["data", "check", str(tmp_path / "x.json")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'x.json'}: not readable\n  1 problem(s):\n    x.json: top level must be")
    report = check_dataset(tmp_path / "nothing")
    assert report.problems[0].code == "not_found" and not report.ok


def test_images_flag_and_no_decode(tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps([RECORDS[2]]))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "1.png").write_bytes(b"not decoded")
    assert main(["data", "check", str(tmp_path / "d.json"), "--images", str(tmp_path / "pics"), "--no-decode"]) == 0
    assert main(["data", "check", str(tmp_path / "d.json"), "--images", str(tmp_path / "pics")]) == 1
    capsys.readouterr()
