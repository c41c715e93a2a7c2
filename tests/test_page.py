"""`clbench report`: one self-contained HTML page, checked as text and rendered in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from clbench.cli import main
from clbench.config import resolve
from clbench.run import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and unable to reach anything: every host resolves to nothing and any connection goes to a closed
# loopback port, so the only thing it can load is the file itself.
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-pings",
           "--disable-default-apps", "--disable-domain-reliability", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--enable-logging=stderr", "--v=0"]


@pytest.fixture
def comparison(small_comparison):
    return small_comparison


def test_compare_writes_one_self_contained_page(comparison):
    page = (comparison / "report.html").read_text()
    assert "<table>" in page and "least forgetting with" in page
    for name in ("Drop (%)", "Abs. change (pp)", "Forgetting (pp)", "BatchNorm attribution", "clbench compare"):
        assert name in page, name
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)   # nothing fetched
    assert "--strategies naive,bn_per_task" in page and f"--name {comparison.name}" in page


def test_report_of_a_run_folder_through_the_cli(tiny_args, capsys):
    run_dir = run(resolve(None, {**tiny_args, "strategy": "lwf", "run_id": "paged"}))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert "clbench run" in page and "--strategy lwf" in page and "Primary metric after every stage" in page
    # chance.json: top-1 of the most frequent test class (counted here from the folder itself), mAP 0
    from collections import Counter

    from clbench.benchmarks import load_task
    chance = json.loads((run_dir / "chance.json").read_text())
    labels = [label for _, label in load_task(tiny_args["data_root"], "cls", image_size=64).test.samples]
    assert chance["cls"] == max(Counter(labels).values()) / len(labels)
    assert chance["det"] == 0.0 and 0 < chance["seg"] < 1


def test_report_of_a_folder_that_is_neither_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_the_page_renders_in_headless_chromium_with_every_image_and_the_table(comparison, tmp_path):
    url = (comparison / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *OFFLINE, "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert images and images.group(1) == images.group(2) and int(images.group(2)) >= 3   # every plot decoded
    assert "<table>" in dom.stdout and "bn_per_task" in dom.stdout
    assert "Uncaught" not in dom.stderr and "Failed to load resource" not in dom.stderr
    shot = tmp_path / "report.png"
    result = subprocess.run([CHROMIUM, *OFFLINE, "--window-size=1280,2000", f"--screenshot={shot}", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    colours = Image.open(shot).convert("L").getextrema()
    assert colours[0] < 60 and colours[1] > 200   # text on a light page, not a blank image
