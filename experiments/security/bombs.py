"""Decompression bombs against the running stack: RSS of the API and of the worker while each upload is
taken and validated, sampled every 100 ms with psutil (docs/security.md, "Bombs").

Stack as in the outside checks: an own PostgreSQL database, a free Redis DB, moto's S3 server, one
`uvicorn api.main:app` process and one Celery worker (`-P solo`), both started fresh for every case so
that each peak is measured from a clean baseline. Traffic only on 127.0.0.1.

    python experiments/security/bombs.py --out experiments/security/bombs-after.json
    python experiments/security/bombs.py --src /tmp/main-tree --out bombs-before.json   # another tree

`--src` runs the API and the worker from another source tree (e.g. `git archive main`), so the same cases
give the before and after figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, Stack  # noqa: E402

GIB = 1024**3
MB = 1024**2


# -- the uploads -----------------------------------------------------------------------------------
def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG declaring width x height (8-bit RGB); `rows` is the raw scanline data (default: all zero,
    which deflates ~1000x, so a huge declared image stays a small file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows is None:
        comp, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)
        body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        body = zlib.compress(rows, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


SMALL_PNG = png(8, 8)


def records(n: int, images: int = 1) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "image": f"images/img{i % images}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"A small object number {i % 7}."},
            ],
        }
        for i in range(n)
    ]


class Padded(io.RawIOBase):
    """`pad` spaces, then `tail`: a file-like stream of a huge whitespace-led JSON, never held in memory."""

    def __init__(self, pad: int, tail: bytes) -> None:
        self.pad, self.tail, self.pos = pad, tail, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        total = self.pad + len(self.tail)
        n = min(len(buf), total - self.pos)
        if n <= 0:
            return 0
        spaces = max(0, min(n, self.pad - self.pos))
        buf[:spaces] = b" " * spaces
        rest = n - spaces
        if rest:
            start = self.pos + spaces - self.pad
            buf[spaces:n] = self.tail[start : start + rest]
        self.pos += n
        return n


def zip_with(
    path: Path, files: dict[str, bytes], streams: dict[str, tuple[io.RawIOBase, int]] | None = None
) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (stream, _size) in (streams or {}).items():
            with zf.open(name, "w", force_zip64=True) as out:
                shutil.copyfileobj(stream, out, MB)
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def targz_with(
    path: Path, files: dict[str, bytes], streams: dict[str, tuple[io.RawIOBase, int]] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, (stream, size) in (streams or {}).items():
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BufferedReader(stream, MB))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def bad_crc(path: Path) -> Path:
    """A zip whose data.json has a wrong CRC-32 in both its local and its central header."""
    zip_with(path, {"data.json": json.dumps(records(3)).encode(), "images/img0.png": SMALL_PNG})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info, pos = zf.getinfo("data.json"), zf.start_dir
    wrong = struct.pack("<I", info.CRC ^ 0xFFFFFFFF)
    data[info.header_offset + 14 : info.header_offset + 18] = wrong  # local file header
    while data[pos : pos + 4] == b"PK\x01\x02":  # central directory entries
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + name_len] == b"data.json":
            data[pos + 16 : pos + 20] = wrong
        pos += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))
    return path


def max_image_pixels(src: Path) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from api.config import CommonSettings as C;print(C.model_fields['max_image_pixels'].default)",
        ],
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def build_cases(folder: Path, src: Path, entries: int, big_records: int) -> dict[str, Path]:
    """name -> archive. The first five are the outside checks' bombs; the last three are valid uploads at
    the limits (pixels, archive entries, records)."""
    folder.mkdir(parents=True, exist_ok=True)
    tail = json.dumps(records(3)).encode()
    small = {"images/img0.png": SMALL_PNG}
    side = int(max_image_pixels(src) ** 0.5)
    makers = {
        "zip_json_1gib_whitespace": lambda p: zip_with(
            p, small, {"data.json": (Padded(GIB, tail), GIB + len(tail))}
        ),
        "targz_json_1gib_whitespace": lambda p: targz_with(
            p, small, {"data.json": (Padded(GIB, tail), GIB + len(tail))}
        ),
        "png_huge_dimensions": lambda p: zip_with(
            p,
            {
                "data.json": json.dumps(records(1)).encode(),
                "images/img0.png": png(100_000, 100_000, b"\0" * 64),
            },
        ),
        "json_100k_deep": lambda p: zip_with(p, {"data.json": b"[" * 100_000 + b"]" * 100_000, **small}),
        "zip_bad_crc": bad_crc,
        "png_at_pixel_limit": lambda p: zip_with(
            p, {"data.json": json.dumps(records(1)).encode(), "images/img0.png": png(side, side)}
        ),
        "entries_at_limit": lambda p: zip_with(
            p,
            {
                "data.json": json.dumps(records(entries - 1, entries - 1)).encode(),
                **{f"images/img{i}.png": SMALL_PNG for i in range(entries - 1)},
            },
        ),
        "records_at_limit": lambda p: zip_with(
            p, {"data.json": json.dumps(records(big_records)).encode(), **small}
        ),
    }
    cases = {}
    for name, make in makers.items():
        path = (
            folder
            / f"{name}-{side if 'pixel' in name else ''}.{'tar.gz' if name.startswith('targz') else 'zip'}"
        )
        if name == "entries_at_limit":
            path = folder / f"{name}-{entries}.zip"
        if name == "records_at_limit":
            path = folder / f"{name}-{big_records}.zip"
        if not path.exists():
            tmp = path.with_suffix(".part")
            make(tmp)
            tmp.rename(path)
        cases[name] = path
    return cases


class Sampler(threading.Thread):
    """Peak RSS of some processes, every 100 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.stop = threading.Event()

    def sample(self) -> dict[str, int]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = proc.memory_info().rss
            except psutil.Error:
                out[name] = 0
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for name, rss in self.sample().items():
                self.peak[name] = max(self.peak[name], rss)
            time.sleep(0.1)


def run_case(stack: Stack, name: str, path: Path, timeout: float) -> dict:
    pids = stack.start()
    sampler = Sampler(pids)
    base = dict.fromkeys(pids, 0)
    for _ in range(5):  # the idle baseline: the largest of five samples
        base = {k: max(v, base[k]) for k, v in sampler.sample().items()}
        time.sleep(0.1)
    sampler.start()
    headers = {"Authorization": f"Bearer {stack.key}"}
    url = f"http://127.0.0.1:{stack.port}"
    started = time.monotonic()
    outcome = {}
    try:
        with open(path, "rb") as fh:
            response = httpx.post(
                f"{url}/v1/datasets", headers=headers, files={"file": (path.name, fh)}, timeout=timeout
            )
        outcome["http"] = response.status_code
        body = response.json()
        outcome["code"] = (body.get("error") or {}).get("code")
        if response.status_code == 201:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                body = httpx.get(f"{url}/v1/datasets/{body['id']}", headers=headers, timeout=60).json()
                if body["status"] != "validating":
                    break
                time.sleep(0.5)
            outcome["dataset"] = body["status"]
            outcome["code"] = (body.get("error") or {}).get("code")
            outcome["message"] = (body.get("error") or {}).get("message", "")[:160]
        else:
            outcome["message"] = (body.get("error") or {}).get("message", "")[:160]
    except (httpx.HTTPError, ValueError) as exc:
        outcome["http"] = f"{type(exc).__name__}"
    seconds = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    stack.stop()
    return {
        "case": name,
        "upload_bytes": path.stat().st_size,
        **outcome,
        "seconds": round(seconds, 1),
        **{f"{k}_base_mb": round(base[k] / MB) for k in pids},
        **{f"{k}_delta_mb": round((sampler.peak[k] - base[k]) / MB) for k in pids},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, default=ROOT, help="source tree the API and worker run from")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "disp-bombs",
        help="where the uploads are built (kept for reruns)",
    )
    parser.add_argument("--entries", type=int, default=50_000, help="files in the entries_at_limit archive")
    parser.add_argument("--records", type=int, default=140_000, help="records in records_at_limit (~24 MiB of JSON)")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    cases = build_cases(args.cache, args.src.resolve(), args.entries, args.records)
    with tempfile.TemporaryDirectory(prefix="disp-bombs-") as work:
        stack = Stack(args.src.resolve(), Path(work))
        rows = []
        try:
            for name, path in cases.items():
                if args.only and name not in args.only:
                    continue
                row = run_case(stack, name, path, args.timeout)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            stack.close()
    print("\n| case | upload | outcome | API ΔRSS MB | worker ΔRSS MB | s |\n|---|---|---|---|---|---|")
    for r in rows:
        outcome = f"{r.get('http')} {r.get('dataset', '')} {r.get('code') or ''}".strip()
        print(
            f"| {r['case']} | {r['upload_bytes'] / MB:.1f} MB | {outcome} | {r['api_delta_mb']} | "
            f"{r['worker_delta_mb']} | {r['seconds']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
