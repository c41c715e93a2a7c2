"""The docs: the site builds with `mkdocs build --strict`, and every block marked runnable runs as written (with
tiny settings added), so a command the docs show is a command that works."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = re.compile(r"<!-- runnable -->\n```bash\n(.*?)```", re.S)


def runnable_lines() -> list[tuple[str, str]]:
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in RUNNABLE.findall(page.read_text()):
            out += [(page.name, line) for line in block.splitlines() if line.strip()]
    return out


def tiny(argv: list[str], tiny_args: dict) -> list[str]:
    """``argv`` with the tiny settings added where the command takes them and the line does not set them."""
    command = argv[0]
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if command in ("run", "compare"):
        extra = {k: v for k, v in tiny_args.items() if k != "out" and f"--{k.replace('_', '-')}" not in given}
        return argv + [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    if command == "eval":
        return argv + [f"--data-root={tiny_args['data_root']}"]
    return argv


def test_the_docs_have_runnable_blocks():
    lines = runnable_lines()
    assert len(lines) >= 5 and all(line.startswith(("clbench ", "python -c ")) for _, line in lines)


@pytest.mark.slow
def test_every_runnable_docs_line_runs(tiny_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # results/ of the lines lands here
    example = re.search(r"<!-- example-plugin -->\n```python\n(.*?)```", (ROOT / "docs" / "strategies.md").read_text(),
                        re.S).group(1)
    (tmp_path / "my_l2.py").write_text(example)      # the file the strategies page tells the reader to save
    for page, line in runnable_lines():
        if line.startswith("python -c "):
            result = subprocess.run([sys.executable, *shlex.split(line)[1:]], capture_output=True, text=True,
                                    cwd=tmp_path, timeout=300)
            assert result.returncode == 0, f"{page}: {line}\n{result.stderr[-2000:]}"
            continue
        argv = tiny(shlex.split(line)[1:], tiny_args)
        assert main(argv) == 0, f"{page}: {line}"
    assert (tmp_path / "results" / "demo" / "report.html").exists()


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                        "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count("StageContext") > 0
