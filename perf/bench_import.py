"""`clbench data import` on a 900-image mini set vs the bare work it cannot avoid.

The set is written in a student's layout (COCO JSON beside image folders, VOC with JSON lists, ImageNetV2-style
numeric class folders with TXT lists; tests/test_import.py's builder) at a real image size (500x375 JPEGs):
8n images (2n detection, 2n segmentation with their masks, 4n classification), 904 with the default n. The bare
baseline,
measured in the same run: read every source file, sha256 it, decode it with PIL, copy it. Prints both times and
the ratio (the target: well under a minute for the import).

    python perf/bench_import.py [--n 113] [--size 500,375] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_import import student_b  # noqa: E402  (the tests' layout builder)

from clbench.benchmarks.importer import import_data  # noqa: E402


def bare(src: Path, out: Path) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            with Image.open(path) as image:
                image.load()
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=113, help="images per split and task (classification: 2n)")
    parser.add_argument("--size", default="500,375")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        student_b(src, args.n, size=size)  # type: ignore[arg-type]
        images = sum(1 for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        times: dict[str, list[float]] = {"import": [], "bare": []}
        for repeat in range(args.repeats):
            for name in ("import", "bare") if repeat % 2 == 0 else ("bare", "import"):
                out = Path(tmp) / f"{name}{repeat}"
                start = time.perf_counter()
                if name == "import":
                    import_data(src, out, say=lambda line: None)
                else:
                    bare(src, out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{images} images of {size[0]}x{size[1]} (+ {images // 4} masks), median of {args.repeats}")
    print(f"clbench data import: {med['import']:.2f} s   bare read+sha256+decode+copy: {med['bare']:.2f} s   "
          f"ratio {med['import'] / med['bare']:.2f}")


if __name__ == "__main__":
    main()
