"""`disp data check`: what a dataset holds and what is wrong with it, without a model (no torch here).

The same report comes from the CLI, the API's dry run (``POST /v1/datasets/check``) and the worker's
validation of an upload: records, turns, images, the format detected, text-only records, and every problem
with its record index, id and field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from disp.data import DataError, _record_error
from disp.formats import Dataset, FormatError, read_dataset
from disp.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS

MAX_PROBLEMS = 100  # problems listed in a report; `problems_total` counts them all


@dataclass
class Problem:
    """One thing wrong: the record (index in the file, id) and field where known, and what is wrong."""

    message: str
    index: int | None = None
    id: str | None = None
    field: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, err: DataError) -> Problem:
        return cls(str(err), err.index, err.record_id, err.field, getattr(err, "code", None))


@dataclass
class DatasetReport:
    """What `check_dataset` found."""

    path: str = field(metadata={"help": "the dataset checked"})
    format: str | None = field(default=None, metadata={"help": "json, jsonl, cc-sbu-align, parquet or hf-datasets"})
    data_file: str | None = field(default=None, metadata={"help": "the data file read"})
    record_formats: dict[str, int] = field(default_factory=dict, metadata={
        "help": "records per shape: llava, sharegpt, openai-messages, cc-sbu-align (invalid: unreadable)"})
    records: int = field(default=0, metadata={"help": "records in the file"})
    samples: int = field(default=0, metadata={"help": "records with an image: scored, purified, trained on"})
    text_only: int = field(default=0, metadata={"help": "records without an image: kept in every output as they are"})
    multi_turn: int = field(default=0, metadata={"help": "records with more than one user/assistant exchange"})
    turns: int = field(default=0, metadata={"help": "user and assistant turns of the valid records"})
    system_prompts: int = field(default=0, metadata={"help": "records with their own system prompt"})
    images: int = field(default=0, metadata={"help": "distinct images the records name"})
    images_checked: int = field(default=0, metadata={"help": "distinct images found and decoded"})
    image_source: str | None = field(default=None, metadata={"help": "where images were looked up"})
    problems_total: int = field(default=0, metadata={"help": "problems found (at most 100 are listed)"})
    problems: list[Problem] = field(default_factory=list)
    ok: bool = field(default=False, metadata={"help": "true when no problem was found"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_problems(ds: Dataset, decode: bool) -> tuple[list[DataError], int]:
    """One problem per sample whose image is missing or (with `decode`) does not decode; images checked."""
    state: dict[str, str | None] = {}
    problems = []
    for s in ds.samples:
        if s.image not in state:
            try:
                if not ds.source.exists(s.image):
                    state[s.image] = f"refers to {s.image!r}, which is not in {ds.source.name}{ds.source.where_hint()}"
                else:
                    state[s.image] = None
                    if decode:
                        ds.source.open(s.image)
            except DataError as err:
                state[s.image] = f"refers to {s.image!r}, which is unusable: {err}"
        if state[s.image] is not None:
            problems.append(_record_error(ds.name, s.index, s.id, "image", state[s.image]))
    return problems, sum(v is None for v in state.values())


def check_dataset(path: str | Path, images: str | Path | None = None, *, decode: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                  name: str | None = None) -> DatasetReport:
    """Read a dataset of any supported format and check every record and (with `decode`) every image.

    Nothing raises for bad data: every problem is in the report. `name` replaces the path in it.
    """
    report = DatasetReport(path=name or str(path))
    try:
        ds = read_dataset(path, images, max_pixels=max_pixels, max_bytes=max_bytes)
    except DataError as err:
        report.problems, report.problems_total = [Problem.of(err)], 1
        return report
    report.format, report.data_file, report.image_source = ds.format, ds.name, ds.source.name
    report.records, report.samples, report.text_only = len(ds.records), len(ds.samples), len(ds.text_only)
    report.record_formats = dict(Counter(ds.parsed.shapes))
    for s in ds.samples:
        report.turns += 2 * len(s.answers)
        report.multi_turn += len(s.answers) > 1
        report.system_prompts += s.system is not None
    for i in ds.text_only:  # text-only records parsed fine: count their turns from the record
        conv = ds.records[i]["conversations"]
        n = sum(t.get("from") != "system" for t in conv)
        report.turns += n
        report.multi_turn += n > 2
        report.system_prompts += len(conv) > n or ds.records[i].get("system") is not None
    report.images = len({s.image for s in ds.samples})
    image_problems, report.images_checked = _image_problems(ds, decode)
    problems = sorted(ds.problems + image_problems, key=lambda e: (e.index is not None, e.index or 0))
    if not ds.records:
        problems.insert(0, FormatError(f"{ds.name}: the dataset has no records", code="empty_dataset", source=ds.name))
    report.problems_total = len(problems)
    report.problems = [Problem.of(p) for p in problems[:MAX_PROBLEMS]]
    report.ok = not problems
    return report


def format_report(report: DatasetReport) -> str:
    """The report as a few lines of text for a terminal."""
    lines = [f"{report.path}: " + (f"{report.format} ({report.data_file})" if report.format else "not readable")]
    if report.format:
        shapes = ", ".join(f"{n} {k}" for k, n in sorted(report.record_formats.items()))
        lines += [
            f"  records      {report.records} ({shapes})",
            f"  with image   {report.samples} (scored, purified, trained on)",
            f"  text-only    {report.text_only} (kept in every output as they are, never scored)",
            f"  turns        {report.turns} in all; {report.multi_turn} multi-turn record(s); "
            f"{report.system_prompts} with a system prompt",
            f"  images       {report.images} distinct, {report.images_checked} found and decoded "
            f"(from {report.image_source})",
        ]
    if report.ok:
        lines.append("  no problems")
    else:
        lines.append(f"  {report.problems_total} problem(s):")
        lines += [f"    {p.message}" for p in report.problems]
        if report.problems_total > len(report.problems):
            lines.append(f"    ... and {report.problems_total - len(report.problems)} more")
    return "\n".join(lines)
