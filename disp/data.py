"""LLaVA-format visual instruction data: records, samples, image sources and a torch Dataset.

A record is ``{"id": str|int, "image": "rel/path.png", "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``. Each record becomes one `Sample`: turn 0 (human) is the question,
turn 1 (gpt) the answer; later turns are checked for shape but otherwise ignored.

Rules, decided once here:
- ids are compared as strings, so ``1`` and ``"1"`` collide; `Sample.id` is always a string.
- the question holds at most one ``<image>``; with none, ``"<image>\\n"`` is prepended (as LLaVA's
  preprocessing does); a placeholder that is present is left where it is written.
- image names are relative ``/``-separated paths without ``..``, looked up relative to the image source's
  root; if the name is not found there and every file of the source lies under one top-level folder
  (an archive of ``images/...``), the name is looked up under that folder.
- text must not contain the tokenizer's special tokens: they would break the chat template.
- images are decoded from memory, never extracted to disk, and only as PNG/JPEG/WEBP/GIF/BMP/TIFF.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from disp.constants import IMAGE_PLACEHOLDER, SPECIAL_TOKENS
from disp.images import (  # noqa: F401  (re-exported: the data API in one place)
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    DataError,
    FolderSource,
    ImageSource,
    TarSource,
    ZipSource,
    _record_error,
    normalise_name,
    open_image_source,
)


@dataclass(frozen=True)
class Sample:
    """One training/evaluation example.

    Args:
        index: position of the record in its file.
        id: record id as a string.
        image: normalised relative image name.
        question: first human turn, with exactly one ``<image>``.
        answer: the gpt turn after it.
    """

    index: int
    id: str
    image: str
    question: str
    answer: str


def _check_text(value: Any, source: str, index: int, rid: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _record_error(source, index, rid, field, f"must be a string, got {type(value).__name__}")
    for token in SPECIAL_TOKENS:
        if token in value:
            raise _record_error(source, index, rid, field, f"must not contain the special token {token!r}")
    return value


def _parse_one(rec: Any, source: str, index: int) -> Sample:
    if not isinstance(rec, dict):
        raise DataError(f"{source}: record {index}: must be an object, got {type(rec).__name__}",
                        source=source, index=index)
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or (isinstance(rid, str) and not rid.strip()):
        raise _record_error(source, index, None, "id", f"must be a non-empty string or integer, got {rid!r}")
    if "image" not in rec:
        raise _record_error(source, index, rid, "image", "is missing (text-only records are not supported)")
    if not isinstance(rec["image"], str):
        raise _record_error(source, index, rid, "image",
                            f"must be one relative path string, got {type(rec['image']).__name__}")
    try:
        image = normalise_name(rec["image"])
    except ValueError as err:
        raise _record_error(source, index, rid, "image", str(err)) from None
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        got = f"{len(conv)} turn(s)" if isinstance(conv, list) else repr(type(conv).__name__)
        raise _record_error(source, index, rid, "conversations", f"must be a list of >= 2 turns, got {got}")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _record_error(source, index, rid, f"conversations[{t}]",
                                f"must be an object, got {type(turn).__name__}")
        want = ("human",) if t == 0 else ("gpt",) if t == 1 else ("human", "gpt")
        role = turn.get("from")
        if role not in want:
            raise _record_error(source, index, rid, f"conversations[{t}].from",
                                f"must be {' or '.join(map(repr, want))}, got {role!r}")
        _check_text(turn.get("value"), source, index, rid, f"conversations[{t}].value")
    question, answer = conv[0]["value"], conv[1]["value"]
    count = question.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise _record_error(source, index, rid, "conversations[0].value",
                            f"must contain at most one {IMAGE_PLACEHOLDER!r}, got {count}")
    if count == 0:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if IMAGE_PLACEHOLDER in answer:
        raise _record_error(source, index, rid, "conversations[1].value",
                            f"must not contain {IMAGE_PLACEHOLDER!r}")
    return Sample(index=index, id=str(rid), image=image, question=question, answer=answer)


def parse_record(rec: Any, source_name: str, index: int) -> Sample:
    """One record to a `Sample` (the per-record checks of `parse_samples`, for records read as a stream)."""
    return _parse_one(rec, source_name, index)


def parse_samples(records: Any, source_name: str = "records") -> list[Sample]:
    """Validate LLaVA records and turn each into a `Sample`; DataError names the first bad record/field."""
    if not isinstance(records, list):
        raise DataError(f"{source_name}: top level must be a list of records, got {type(records).__name__}",
                        source=source_name)
    samples, seen = [], {}
    for index, rec in enumerate(records):
        sample = _parse_one(rec, source_name, index)
        if sample.id in seen:
            raise _record_error(source_name, index, sample.id, "id",
                                f"duplicates the id of record {seen[sample.id]}")
        seen[sample.id] = index
        samples.append(sample)
    return samples


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON list of records (UTF-8); DataError on unreadable JSON or a non-list top level."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path.name}: cannot read: {err}", source=path.name) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path.name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
                        source=path.name) from None
    if not isinstance(data, list):
        raise DataError(f"{path.name}: top level must be a list of records, got {type(data).__name__}",
                        source=path.name)
    return data


def load_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """`load_records` then `parse_samples`, errors naming the file."""
    return parse_samples(load_records(path), Path(path).name)


def to_record(sample: Sample, *, image: str | None = None, answer: str | None = None) -> dict[str, Any]:
    """Two-turn LLaVA record of a sample, optionally with another image name or answer."""
    return {"id": sample.id, "image": sample.image if image is None else image,
            "conversations": [{"from": "human", "value": sample.question},
                              {"from": "gpt", "value": sample.answer if answer is None else answer}]}


def replace_answers(records: list[dict[str, Any]], answers: Mapping[str, str],
                    source_name: str = "records") -> list[dict[str, Any]]:
    """Copy of validated records with turn 1 (the answer) replaced for each id in ``answers``."""
    samples = parse_samples(records, source_name)
    unknown = sorted(set(answers) - {s.id for s in samples})
    if unknown:
        raise DataError(f"{source_name}: answers given for unknown ids {unknown[:10]}", source=source_name)
    out = copy.deepcopy(records)
    for sample, rec in zip(samples, out, strict=True):
        if sample.id in answers:
            rec["conversations"][1]["value"] = _check_text(answers[sample.id], source_name, sample.index,
                                                           sample.id, "conversations[1].value")
    return out


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON atomically (UTF-8, indent 1, trailing newline), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_records(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write a list of LLaVA records (see `write_json`)."""
    return write_json(path, [dict(r) for r in records])


def validate_dataset(samples: Iterable[Sample], source: ImageSource, *, check_images: bool = True,
                     max_bytes: int | None = None, source_name: str = "dataset", max_report: int = 10) -> None:
    """Check each sample's image exists (and, with ``check_images``, decodes; with ``max_bytes``, is small).

    ``samples`` may be a stream (it is read once). Raises one DataError listing up to ``max_report`` bad
    records; its fields describe the first one.
    """
    problems: list[DataError] = []
    count = 0
    for s in samples:
        count += 1
        try:
            if not source.exists(s.image):
                problem = f"refers to {s.image!r}, which is not in {source.name}"
            elif max_bytes is not None and source.size(s.image) > max_bytes:
                problem = f"refers to {s.image!r} of {source.size(s.image)} bytes, above the limit of {max_bytes}"
            else:
                problem = None
                if check_images:
                    source.open(s.image)
        except DataError as err:
            problem = f"refers to {s.image!r}, which is unusable: {err}"
        if problem is not None:
            problems.append(_record_error(source_name, s.index, s.id, "image", problem))
    if problems:
        lines = [str(p) for p in problems[:max_report]]
        if len(problems) > max_report:
            lines.append(f"... and {len(problems) - max_report} more")
        first = problems[0]
        raise DataError(f"{len(problems)} of {count} records have unusable images:\n" + "\n".join(lines),
                        source=source_name, index=first.index, record_id=first.record_id, field="image")


class LlavaDataset:
    """Samples with their decoded images; item ``i`` is ``(Sample, PIL RGB image)``; a map-style dataset
    for `torch.utils.data.DataLoader` without importing torch here."""

    def __init__(self, samples: Sequence[Sample], source: ImageSource, source_name: str = "dataset") -> None:
        self.samples, self.source, self.source_name = list(samples), source, source_name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Sample, Image.Image]:
        s = self.samples[i]
        try:
            return s, self.source.open(s.image)
        except DataError as err:
            raise _record_error(self.source_name, s.index, s.id, "image",
                                f"refers to {s.image!r}, which is unusable: {err}") from None


def collate_samples(batch: Sequence[tuple[Sample, Image.Image]]) -> dict[str, list[Any]]:
    """DataLoader collate: ``{"samples": [Sample], "images": [PIL image]}``, no tensors."""
    return {"samples": [s for s, _ in batch], "images": [img for _, img in batch]}
