"""`clbench data download`: the official archives, with progress, resume (HTTP Range) and checksums.

Nothing the user already has is deleted: a complete file whose checksum is wrong is reported, not
replaced; an interrupted download stays as ``<name>.part`` and the next call resumes it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clbench import ClbenchError

from .sources import file_digest


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    md5: str
    size: int | None = None


# The official archives and their published md5 checksums.
ARCHIVES = {
    "coco": (Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
                     "442b8da7639aecaf257c1dceb8ba8c80", 815585330),
             Archive("annotations_trainval2017.zip",
                     "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                     "f4bbac642086de4f52a3fdda2de5fa2c", 252907541)),
    "coco-train": (Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
                           "cced6f7f71b7629ddf16f17bbcfab6b2", 19336861798),),
    "voc": (Archive("VOCtrainval_11-May-2012.tar",
                    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                    "6cd6e144f989b92b3379bac3b3de84fd"),),
    "imagenette": (Archive("imagenette2-160.tgz", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                           "e793b78cc4c9e9a4ccc0c1155377a412"),),
}


def download(archive: Archive, folder: Path, *, mirror: str | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch one archive into ``folder`` (resuming ``<name>.part``) and check its md5."""
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / archive.name, folder / f"{archive.name}.part"
    if final.exists():
        found = file_digest(final, "md5")
        if found != archive.md5:
            raise ClbenchError(f"{final}: exists with md5 {found}, expected {archive.md5}; left untouched "
                               "(move or delete it to download again)")
        return final
    url = f"{mirror.rstrip('/')}/{archive.name}" if mirror else archive.url
    _fetch(url, part, progress=progress, timeout=timeout, name=archive.name)
    found = file_digest(part, "md5")
    if found != archive.md5:
        raise ClbenchError(f"{part}: downloaded from {url} with md5 {found}, expected {archive.md5}; kept for "
                           "inspection (delete it to start over)")
    os.replace(part, final)
    return final


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, name: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after what we have: the part is complete
            return
        raise ClbenchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClbenchError(f"{url}: cannot connect ({exc}); rerun to resume") from None
    with response:
        resumed = response.status == 206
        total = response.length + (have if resumed else 0) if response.length is not None else None
        mode = "ab" if resumed else "wb"  # a server that ignores Range sends everything again
        with open(part, mode) as fh, tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                                          desc=name, disable=not progress) as bar:
            try:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except OSError as exc:
                raise ClbenchError(f"{url}: interrupted after {fh.tell()} bytes ({exc}); rerun to resume") from None
    if total is not None and part.stat().st_size < total:
        raise ClbenchError(f"{url}: interrupted after {part.stat().st_size} of {total} bytes; rerun to resume")


def download_all(folder: Path, which: list[str], *, mirror: str | None = None, progress: bool = True) -> list[Path]:
    unknown = [w for w in which if w not in ARCHIVES]
    if unknown:
        raise ClbenchError(f"--only {unknown[0]}: expected some of {', '.join(ARCHIVES)}")
    return [download(a, folder, mirror=mirror, progress=progress) for w in which for a in ARCHIVES[w]]
