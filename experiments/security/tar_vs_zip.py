"""Validation time of the same images in a zip, a tar and a tar.gz (docs/security.md, "Tar datasets"):
`disp.data.validate_dataset` decodes every image through the archive's image source.

    python experiments/security/tar_vs_zip.py --images 20000
    python experiments/security/tar_vs_zip.py --images 20000 --src /tmp/main-tree   # another tree's disp
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--src", type=Path, help="source tree whose disp package is measured")
    args = parser.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    from PIL import Image

    from disp.data import Sample, open_image_source, validate_dataset

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    png = buf.getvalue()
    names = [f"images/{i:06d}.png" for i in range(args.images)]
    samples = [Sample(i, str(i), n, "<image>\nq", "a") for i, n in enumerate(names)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"zip": Path(tmp) / "d.zip", "tar": Path(tmp) / "d.tar", "tar.gz": Path(tmp) / "d.tar.gz"}
        with zipfile.ZipFile(paths["zip"], "w") as zf:
            for n in names:
                zf.writestr(n, png)
        for kind in ("tar", "tar.gz"):
            with tarfile.open(paths[kind], "w:gz" if kind == "tar.gz" else "w") as tf:
                for n in names:
                    info = tarfile.TarInfo(n)
                    info.size = len(png)
                    tf.addfile(info, io.BytesIO(png))
        for kind, path in paths.items():
            start = time.perf_counter()
            with open_image_source(path) as source:
                validate_dataset(samples, source, check_images=True)
            rows[kind] = time.perf_counter() - start
    print(f"{args.images} images ({'src ' + str(args.src) if args.src else 'this tree'}):")
    for kind, seconds in rows.items():
        print(f"  {kind:7s} {seconds:7.2f} s   {seconds / rows['zip']:5.2f}x zip")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
