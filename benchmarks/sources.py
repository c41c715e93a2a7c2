"""Read the official downloads the same way whether they are extracted folders or the archives themselves."""

from __future__ import annotations

import abc
import hashlib
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable

from clbench import ClbenchError


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Source(abc.ABC):
    """A set of files addressed by POSIX paths relative to the folder or archive root."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every file's path."""

    @abc.abstractmethod
    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        """The bytes of the named files."""

    def read(self, name: str) -> bytes:
        return self.read_many([name])[name]

    def describe(self) -> dict[str, str]:
        """What the manifest records: the archive's sha256, or the folder's path."""
        if self.path.is_file():
            return {"archive": self.path.name, "sha256": file_digest(self.path)}
        return {"folder": str(self.path)}


class FolderSource(Source):
    def names(self) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        return {name: (self.path / name).read_bytes() for name in names}


class ZipSource(Source):
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as zf:
            return sorted(n for n in zf.namelist() if not n.endswith("/"))

    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        with zipfile.ZipFile(self.path) as zf:
            return {name: zf.read(name) for name in names}


class TarSource(Source):
    """.tar, .tgz, .tar.gz; ``read_many`` reads what it needs in one pass (a gzip stream cannot seek back)."""

    def names(self) -> list[str]:
        with tarfile.open(self.path) as tf:
            return sorted(m.name for m in tf.getmembers() if m.isfile())

    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        wanted, out = set(names), {}
        with tarfile.open(self.path) as tf:
            for member in tf:
                if member.name in wanted:
                    out[member.name] = tf.extractfile(member).read()
        missing = wanted - set(out)
        if missing:
            raise ClbenchError(f"{self.path}: {sorted(missing)[0]} not in the archive")
        return out


class MultiSource(Source):
    """Several archives/folders seen as one tree (COCO ships images and annotations separately)."""

    def __init__(self, parts: list[Source]) -> None:
        super().__init__(parts[0].path)
        self.parts = parts
        self._owner = {name: part for part in parts for name in part.names()}

    def names(self) -> list[str]:
        return sorted(self._owner)

    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        grouped: dict[int, list[str]] = {}
        for name in names:
            grouped.setdefault(id(self._owner[name]), []).append(name)
        out = {}
        for part in self.parts:
            out.update(part.read_many(grouped.get(id(part), [])))
        return out

    def describe(self) -> list[dict[str, str]]:  # type: ignore[override]
        return [part.describe() for part in self.parts]


def open_source(path: Path) -> Source:
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if not path.exists():
        raise ClbenchError(f"{path}: not found")
    if zipfile.is_zipfile(path):
        return ZipSource(path)
    if tarfile.is_tarfile(path):
        return TarSource(path)
    raise ClbenchError(f"{path}: neither a folder nor a zip/tar archive")


def find_prefix(names: list[str], marker: str, what: str, where: Path) -> str:
    """The folder prefix under which ``marker`` lives (archives nest their content differently)."""
    for name in names:
        if name == marker or name.endswith("/" + marker):
            return name[: len(name) - len(marker)]
    raise ClbenchError(f"{where}: no {marker} found; expected {what}")
