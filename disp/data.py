"""Visual instruction records: parsing into samples, every turn kept, and the records written back out.

Records come in canonical LLaVA form (`disp.records.to_canonical`; `disp.formats` reads every supported
file format into it): ``{"id", "image"?, "conversations": [{"from": "system"?}, {"from": "human"},
{"from": "gpt"}, ...]}``. Each record with an image becomes one `Sample` holding every exchange; a record
without one is text-only: it is checked, never scored, purified or trained on, and kept in every output.

Rules, decided once here:
- ids are compared as strings, so ``1`` and ``"1"`` collide; `Sample.id` is always a string.
- roles: human/user, gpt/assistant, and one optional system turn first (or a top-level ``system``). After
  it, user and assistant turns alternate, starting with the user and ending with the assistant.
- the image is shown in the first user turn: it holds at most one ``<image>``; with none, ``"<image>\\n"``
  is prepended (as LLaVA's preprocessing does); a placeholder that is present is left where it is written.
  No other turn may hold one (one image per record).
- image names are relative ``/``-separated paths without ``..``, looked up in the image source
  (`disp.images`, which also finds an archive's ``images/0.png`` for a record's ``0.png``).
- text must not contain the tokenizer's special tokens: they would break the chat template.
- images are decoded from memory, never extracted to disk, and only as PNG/JPEG/WEBP/GIF/BMP/TIFF.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from disp.records import ASSISTANT_ROLES, MULTI_IMAGE, SYSTEM_ROLES, USER_ROLES, to_canonical

MAX_LISTED = 10  # problems quoted in one DataError message


@dataclass(frozen=True)
class Sample:
    """One image record: its first exchange (scored) and every later one.

    Args:
        index: position of the record in its file (text-only records count).
        id: record id as a string.
        image: normalised relative image name.
        question: first user turn, with exactly one ``<image>``.
        answer: the assistant turn after it.
        later: the following (user, assistant) exchanges, in order.
        system: the record's own system prompt; None uses the model's default.
        record: the canonical record it was parsed from (outputs are written from it).
    """

    index: int
    id: str
    image: str
    question: str
    answer: str
    later: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    record: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def questions(self) -> tuple[str, ...]:
        """Every user turn, the first with its ``<image>``."""
        return (self.question, *(q for q, _ in self.later))

    @property
    def answers(self) -> tuple[str, ...]:
        """Every assistant turn."""
        return (self.answer, *(a for _, a in self.later))


def _check_text(value: Any, source: str, index: int, rid: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _record_error(source, index, rid, field, f"must be a string, got {type(value).__name__}")
    for token in SPECIAL_TOKENS:
        if token in value:
            raise _record_error(source, index, rid, field, f"must not contain the special token {token!r}")
    return value


def _check_id(rec: dict, source: str, index: int) -> Any:
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or (isinstance(rid, str) and not rid.strip()):
        raise _record_error(source, index, None, "id", f"must be a non-empty string or integer, got {rid!r}")
    return rid


def _exchanges(rec: dict, source: str, index: int, rid: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt, [(user, assistant), ...]) of a canonical record, every turn checked."""
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        got = f"{len(conv)} turn(s)" if isinstance(conv, list) else repr(type(conv).__name__)
        raise _record_error(source, index, rid, "conversations", f"must be a list of >= 2 turns, got {got}")
    system = rec.get("system")
    if system is not None:
        _check_text(system, source, index, rid, "system")
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _record_error(source, index, rid, f"conversations[{t}]", f"must be an object, got {type(turn).__name__}")
        role = turn.get("from")
        if t == 0 and role in SYSTEM_ROLES:
            if system is not None:
                raise _record_error(source, index, rid, "conversations[0]", "is a system turn beside a "
                                    "top-level 'system'; give one of them")
            system = _check_text(turn.get("value"), source, index, rid, "conversations[0].value")
            continue
        want = USER_ROLES if len(turns) % 2 == 0 else ASSISTANT_ROLES
        if role not in want:
            raise _record_error(source, index, rid, f"conversations[{t}].from",
                                f"must be {' or '.join(map(repr, want))}, got {role!r}")
        turns.append((t, _check_text(turn.get("value"), source, index, rid, f"conversations[{t}].value")))
    if len(turns) < 2:
        raise _record_error(source, index, rid, "conversations", f"must be a list of >= 2 turns, got {len(turns)} "
                            "turn(s) besides the system turn")
    if len(turns) % 2:
        raise _record_error(source, index, rid, f"conversations[{turns[-1][0]}]",
                            "is a user turn with no assistant answer after it")
    for k, (t, text) in enumerate(turns):
        if IMAGE_PLACEHOLDER in text and (k % 2 or k > 0):
            problem = (f"must not contain {IMAGE_PLACEHOLDER!r}" if k % 2 else
                       f"holds a second {IMAGE_PLACEHOLDER!r}: the image goes in the first user turn; {MULTI_IMAGE}")
            raise _record_error(source, index, rid, f"conversations[{t}].value", problem)
    return system, [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns), 2)]


def parse_record(rec: dict, source: str, index: int) -> Sample | None:
    """Check one canonical record: a `Sample` for an image record, None for a text-only one."""
    rid = _check_id(rec, source, index)
    system, pairs = _exchanges(rec, source, index, rid)
    (question, answer), later = pairs[0], tuple(pairs[1:])
    count = question.count(IMAGE_PLACEHOLDER)
    first = next(t for t, turn in enumerate(rec["conversations"]) if turn.get("from") in USER_ROLES)
    image = rec.get("image")
    if image is None:
        if count:
            raise _record_error(source, index, rid, f"conversations[{first}].value",
                                f"holds {IMAGE_PLACEHOLDER!r} but the record names no image")
        return None
    if not isinstance(image, str):
        raise _record_error(source, index, rid, "image", f"must be one relative path string, got {type(image).__name__}")
    try:
        image = normalise_name(image)
    except ValueError as err:
        raise _record_error(source, index, rid, "image", str(err)) from None
    if count > 1:
        raise _record_error(source, index, rid, f"conversations[{first}].value",
                            f"must contain at most one {IMAGE_PLACEHOLDER!r}, got {count}")
    if count == 0:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    return Sample(index=index, id=str(rid), image=image, question=question, answer=answer, later=later,
                  system=system, record=rec)


@dataclass
class ParsedRecords:
    """Canonical records with what parsing found: samples (image records), text-only record indices, the
    record shape of each record, and every problem (one DataError per bad record)."""

    records: list[dict[str, Any]]
    samples: list[Sample]
    text_only: list[int]
    shapes: list[str]
    problems: list[DataError]

    def raise_problems(self, source_name: str) -> None:
        """DataError listing up to `MAX_LISTED` bad records (its fields are the first one's), if any."""
        raise_listed(self.problems, f"{len(self.problems)} of {len(self.records)} records of {source_name} are invalid")


def raise_listed(problems: Sequence[DataError], headline: str) -> None:
    """One DataError for several: the only one as it is, else a headline and up to `MAX_LISTED` lines."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    lines = [str(p) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    first = problems[0]
    raise DataError(f"{headline}:\n" + "\n".join(lines), source=first.source, index=first.index,
                    record_id=first.record_id, field=first.field)


def parse_records(records: Any, source_name: str = "records") -> ParsedRecords:
    """Canonicalise and check every record, collecting one problem per bad record instead of stopping."""
    if not isinstance(records, list):
        raise DataError(f"{source_name}: top level must be a list of records, got {type(records).__name__}",
                        source=source_name)
    out = ParsedRecords([], [], [], [], [])
    seen: dict[str, int] = {}
    for index, raw in enumerate(records):
        try:
            rec, shape = to_canonical(raw, index, source_name)
        except DataError as err:
            out.records.append(raw)
            out.shapes.append("invalid")
            out.problems.append(err)
            continue
        out.records.append(rec)
        out.shapes.append(shape)
        try:
            sample = parse_record(rec, source_name, index)
            rid = str(rec["id"])
            if rid in seen:
                raise _record_error(source_name, index, rid, "id", f"duplicates the id of record {seen[rid]}")
            seen[rid] = index
        except DataError as err:
            out.problems.append(err)
            continue
        if sample is None:
            out.text_only.append(index)
        else:
            out.samples.append(sample)
    return out


def parse_samples(records: Any, source_name: str = "records") -> list[Sample]:
    """Check records (any shape `disp.records` reads) and return the image records as samples.

    DataError names the bad record(s) and field(s); text-only records are checked but not returned.
    """
    parsed = parse_records(records, source_name)
    parsed.raise_problems(source_name)
    return parsed.samples


def load_records(path: str | os.PathLike[str]) -> list[Any]:
    """Raw records of one data file in any format `disp.formats` reads (JSON list, JSONL, CC-SBU-Align's
    ``{"annotations": [...]}``, parquet); DataError naming the file and line on unreadable input."""
    from disp.formats import read_data_file

    return read_data_file(Path(path)).rows


def load_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """`load_records` then `parse_samples`, errors naming the file."""
    return parse_samples(load_records(path), Path(path).name)


def answer_turns(record: Mapping[str, Any]) -> list[int]:
    """Positions in ``record["conversations"]`` of its assistant turns, in order."""
    return [t for t, turn in enumerate(record["conversations"]) if turn.get("from") in ASSISTANT_ROLES]


def with_answers(record: Mapping[str, Any], answers: Mapping[int, str] | Sequence[str], *,
                 image: str | None = None, **extra: Any) -> dict[str, Any]:
    """Deep copy of a canonical record with its k-th assistant turn replaced for each k in ``answers``
    (a sequence replaces the first ones), optionally another image name, and extra top-level fields."""
    out = copy.deepcopy(dict(record))
    turns = answer_turns(out)
    items = answers.items() if isinstance(answers, Mapping) else enumerate(answers)
    for k, text in items:
        out["conversations"][turns[k]]["value"] = text
    if image is not None:
        out["image"] = image
    out.update(extra)
    return out


def sample_record(sample: Sample, **kwargs: Any) -> dict[str, Any]:
    """The sample's record with every turn (see `with_answers`), rebuilt when the sample has none."""
    record = sample.record
    if record is None:
        turns = [{"from": "system", "value": sample.system}] if sample.system is not None else []
        for q, a in zip(sample.questions, sample.answers, strict=True):
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        record = {"id": sample.id, "image": sample.image, "conversations": turns}
    answers = kwargs.pop("answers", {})
    return with_answers(record, answers, **kwargs)


def purified_record(sample: Sample, answers: Sequence[str], info: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's record with its answers replaced by the purified ``answers`` (one per assistant turn),
    every other turn and field kept, and a ``disp`` field: ``info`` plus the original and purified first
    answer (``original_answer``/``purified_answer``) and, for a multi-turn record, every answer
    (``original_answers``/``purified_answers``)."""
    if len(answers) != len(sample.answers):
        raise ValueError(f"record {sample.index} (id {sample.id!r}) has {len(sample.answers)} answers, "
                         f"got {len(answers)} purified ones")
    disp = {"original_answer": sample.answer, "purified_answer": answers[0], **info}
    if len(answers) > 1:
        disp.update(original_answers=list(sample.answers), purified_answers=list(answers))
    return sample_record(sample, answers=list(answers), disp=disp)


def answers_kept(record: Mapping[str, Any]) -> bool:
    """Whether a purified record kept every answer it was given (True for a record purification did not touch)."""
    info = record.get("disp") or {}
    return info.get("purified_answers", info.get("purified_answer")) == info.get(
        "original_answers", info.get("original_answer"))


def is_text_only(record: Mapping[str, Any]) -> bool:
    """Whether a canonical record has no image."""
    return record.get("image") is None


def merge_records(records: Sequence[Mapping[str, Any]], replaced: Mapping[int, Mapping[str, Any]],
                  indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Records at ``indices`` (default all) in order, each replaced where ``replaced`` has its index and
    otherwise kept as it is (text-only records pass through every stage this way)."""
    wanted = range(len(records)) if indices is None else sorted(set(indices))
    return [dict(replaced[i]) if i in replaced else dict(records[i]) for i in wanted]


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


def validate_dataset(samples: Sequence[Sample], source: ImageSource, *, check_images: bool = True,
                     max_bytes: int | None = None, source_name: str = "dataset") -> None:
    """Check each sample's image exists (and, with ``check_images``, decodes; with ``max_bytes``, is small).

    Raises one DataError listing up to `MAX_LISTED` bad records; its fields describe the first one.
    """
    problems: list[DataError] = []
    for s in samples:
        try:
            if not source.exists(s.image):
                problem = f"refers to {s.image!r}, which is not in {source.name}{source.where_hint()}"
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
    raise_listed(problems, f"{len(problems)} of {len(samples)} records have unusable images")


def open_sample_image(source: ImageSource, sample: Sample) -> Image.Image:
    """Decode a sample's image; DataError naming the record, the image and what is wrong with it."""
    try:
        return source.open(sample.image)
    except DataError as err:
        raise DataError(f"record {sample.index} (id {sample.id!r}): field 'image' refers to {sample.image!r}, which "
                        f"is unusable: {err}", source=err.source, index=sample.index, record_id=sample.id,
                        field="image") from None


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
