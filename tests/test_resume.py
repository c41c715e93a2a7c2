"""Stage-level resume: a killed run loses at most the stage in progress, and its resumed metrics.csv is
byte-identical to an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import flags

from clbench.cli import main
from clbench.config import resolve
from clbench.run import run

CLBENCH = str(Path(sys.executable).parent / "clbench")
PLUGIN = Path(__file__).parent / "plugins" / "counting.py"



def kill_at(command, marker, where, env_extra=None):
    """Start ``command``; once it signals (marker file) that it reached ``where``, kill -9 its process group."""
    env = {**os.environ, "CLBENCH_TEST_BLOCK": f"{marker}:{where}", **(env_extra or {})}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env=env, text=True)
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"never reached {where}: {process.communicate()[1]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc+lwf+replay"])   # a Fisher, a teacher and a buffer carried over at once
def test_a_run_killed_mid_stage_resumes_to_a_byte_identical_metrics_csv(strategy, tiny_args, tmp_path):
    pick = random.Random(strategy)                      # a random moment of stage 2 or 3, known in advance
    stage, step = pick.choice([2, 3]), pick.randint(1, 3)
    spec = f"{strategy}+{PLUGIN}:Blocking"
    killed = Path(tiny_args["out"]) / "killed"
    kill_at([CLBENCH, "run", *flags(tiny_args, strategy=spec, run_id="killed")], tmp_path / "marker", f"{stage}:{step}")
    assert sorted(pd.read_csv(killed / "metrics.csv")["stage"].unique()) == list(range(stage))
    kept = {p.name: p.stat().st_mtime_ns for p in (killed / "checkpoints").iterdir()}
    result = subprocess.run([CLBENCH, "run", "--resume", str(killed), "--progress", "false"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    whole = run(resolve(None, {**tiny_args, "strategy": spec, "run_id": "killed", "out": str(tmp_path / "whole")}))
    assert (killed / "metrics.csv").read_bytes() == (whole / "metrics.csv").read_bytes()
    assert (killed / "per_class.csv").read_bytes() == (whole / "per_class.csv").read_bytes()
    assert all((killed / "checkpoints" / name).stat().st_mtime_ns == ns for name, ns in kept.items())  # not redone
    history = json.loads((killed / "resume.json").read_text())
    assert [h["resumed_after_stage"] for h in history] == [stage - 1]
    assert "resume" not in (killed / "config.yaml").read_text()


def test_an_unreadable_checkpoint_is_redone_and_nothing_else(tiny_args, capsys):
    run_dir = run(resolve(None, {**tiny_args, "strategy": "ewc", "run_id": "r"}))
    reference = (run_dir / "metrics.csv").read_bytes()
    (run_dir / "checkpoints" / "stage3.pt").unlink()
    (run_dir / "checkpoints" / "stage2.pt").write_bytes(b"truncated")
    stage1 = (run_dir / "checkpoints" / "stage1.pt").stat().st_mtime_ns
    assert main(["run", "--resume", str(run_dir), "--progress", "false"]) == 0
    assert f"clbench: {run_dir / 'checkpoints' / 'stage2.pt'}: unreadable (" in capsys.readouterr().err   # said, not silent
    assert (run_dir / "metrics.csv").read_bytes() == reference
    assert (run_dir / "checkpoints" / "stage1.pt").stat().st_mtime_ns == stage1
    assert json.loads((run_dir / "resume.json").read_text())[0]["resumed_after_stage"] == 1
    ckpt = torch.load(run_dir / "checkpoints" / "stage3.pt", weights_only=True)   # still no pickled objects
    assert set(ckpt["record"]) == {"rows", "per_class", "bn_rows", "curve", "bootstrap", "stages"}


def test_resume_refuses_other_settings_and_non_run_folders(tiny_args, tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--progress", "false"]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "--epochs cannot be given with it" in capsys.readouterr().err
