"""Shared fixtures: a tiny synthetic benchmark and a fast run configuration (timm's test_efficientnet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench.benchmarks.synthetic import SynthSpec, generate
from clbench.tasks import TaskSpec
from clbench.testing import tiny_run_settings

TINY = SynthSpec(seed=3, n_train=12, n_val=10, min_side=40, max_side=64)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, saying why, where torch sees no CUDA device."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and torch sees none here; run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write to the user's ~/.cache."""
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _registry_restored():
    """Strategies a test registers (plugins loaded by path, test classes) are gone after it; the built-ins,
    imported first, stay."""
    from clbench.plugins import registered
    from clbench.strategy import REGISTRY
    registered()
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "tiny", TINY)


def tiny_settings(data_root: Path, **overrides: str) -> dict[str, str]:
    """The tiny run settings (clbench.testing's, at 64 px), without an output folder: the one place tests take
    them from. Latency is timed in the one test about it."""
    settings = {k: v for k, v in tiny_run_settings(data_root, Path()).items() if k != "out"}
    return {**settings, "image_size": "64", **overrides}


def flags(settings: dict, **extra: str) -> list[str]:
    """``--key=value`` command-line flags for settings."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in {**settings, **extra}.items()]


def compare_flags(settings: dict, **extra: str) -> list[str]:
    """Compare flags for settings; the joint bound (the default) is left out: tests/test_bounds.py covers it."""
    return flags(settings, bounds="none", **extra)


@pytest.fixture
def tiny_args(tiny_root: Path, tmp_path: Path) -> dict:
    """CLI-style settings for a 3-stage run that takes a few seconds."""
    return tiny_settings(tiny_root, out=str(tmp_path / "results"))


@pytest.fixture
def specs() -> list[TaskSpec]:
    return [TaskSpec("seg", "seg", "Mini-VOC-Seg", tuple(f"s{i}" for i in range(6))),
            TaskSpec("det", "det", "Mini-COCO-Det", tuple(f"d{i}" for i in range(10)), tuple(range(1, 11))),
            TaskSpec("cls", "cls", "Imagenette-160", tuple(f"c{i}" for i in range(10)))]


@pytest.fixture(scope="session")
def small_comparison(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished comparison (naive, bn_per_task and the joint bound; seeds 0, 1) with both trackers, shared
    by the report-page and tracker tests (a comparison is the slow part of both)."""
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    pytest.importorskip("mlflow", reason="the test extra installs mlflow-skinny")
    from clbench.compare import CompareSettings, compare
    from clbench.config import resolve
    args = tiny_settings(tiny_root, log="tensorboard,mlflow")
    settings = CompareSettings(strategies=("naive", "bn_per_task"), seeds=(0, 1), reference=False,
                               base=resolve(None, args), bounds=("joint",))
    folder = compare(settings, out=tmp_path_factory.mktemp("comparison"), name="small", progress=False)
    return write_views(folder)


def write_views(folder: Path) -> Path:
    """What `clbench compare` writes after the grid: summary.md/csv (picked.json) and report.html, from one read."""
    from clbench.page import write_report
    from clbench.reader import ComparisonData
    from clbench.summary import write_summary
    data = ComparisonData.load(folder)
    write_summary(data)
    write_report(data)
    return folder
