import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import compare_flags as flags

from clbench.cli import main
from clbench.config import resolve
from clbench.run import run


def compare_folder(tiny_args):
    folders = list(Path(tiny_args["out"]).glob("compare-*")) + list(Path(tiny_args["out"]).glob("named*"))
    assert len(folders) == 1
    return folders[0]


def test_compare_runs_the_grid_and_shares_stage_1_bit_identically(tiny_args, tmp_path, capsys):
    assert main(["compare", "--strategies", "naive,ewc", "--seeds", "0,1", *flags(tiny_args)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Strategy") and "Δ naive" in out and "Drop (%) = 100 x" in out
    folder = compare_folder(tiny_args)
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["ewc-seed0", "ewc-seed1", "naive-seed0", "naive-seed1"]
    assert len(list((folder / "cache").glob("stage1-*.pt"))) == 2          # one per seed
    def stage1(cell: str) -> dict:
        return json.loads((folder / "runs" / cell / "resources.json").read_text())["stages"]["1"]
    assert stage1("naive-seed0")["seconds_saved_by_cache"] == 0.0 and stage1("ewc-seed0")["train_seconds"] == 0.0
    assert stage1("ewc-seed0")["seconds_saved_by_cache"] == pytest.approx(stage1("naive-seed0")["train_seconds"])
    assert json.loads((folder / "cache_report.json").read_text())["stage1_reused_by_cells_this_invocation"] == 2
    alone = run(resolve(None, {**tiny_args, "strategy": "ewc", "run_id": "ewc-seed0", "out": str(tmp_path / "alone")}))
    assert (alone / "metrics.csv").read_bytes() == (folder / "runs" / "ewc-seed0" / "metrics.csv").read_bytes()
    assert (folder / "summary.md").read_text().startswith("| Strategy")
    resources = pd.read_csv(folder / "resources.csv")
    assert len(resources) == 4 * 3 and set(resources.cell) == {"ewc-seed0", "ewc-seed1", "naive-seed0", "naive-seed1"}
    cached = resources[(resources.cell == "ewc-seed0") & (resources.stage == 1)].iloc[0]
    # a cached stage's share is against the training it stands for, not against the 0 s it took here
    assert cached.eval_share == pytest.approx(cached.eval_seconds / (cached.seconds_saved_by_cache + cached.eval_seconds
                                                                    + cached.bn_audit_seconds))
    assert f"evaluation: {100 * resources.eval_share.median():.1f}% of a stage's time" in out


def test_a_strategy_that_changes_stage_1_is_not_served_from_the_cache(tiny_args):
    args = ["compare", "--strategies", "naive,bn_frozen", "--set", "bn_frozen.from_stage=1", *flags(tiny_args)]
    assert main(args) == 0
    folder = compare_folder(tiny_args)
    resources = json.loads((folder / "runs" / "bn_frozen-seed0" / "resources.json").read_text())
    assert resources["stages"]["1"]["seconds_saved_by_cache"] == 0.0   # trained, not restored
    assert len(list((folder / "cache").glob("stage1-*.pt"))) == 1       # written by naive only


def test_reopening_a_comparison_with_other_settings_is_refused(tiny_args, capsys):
    assert main(["compare", "--strategies", "naive", "--name", "named", *flags(tiny_args)]) == 0
    assert main(["compare", "--strategies", "naive", "--name", "named", *flags(tiny_args, epochs=2)]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err


def test_an_option_no_strategy_of_the_grid_has_is_an_error(tiny_args, capsys):
    assert main(["compare", "--strategies", "naive,ewc", "--set", "lwf.lam=2", *flags(tiny_args)]) == 2
    assert "--set lwf.lam: no strategy of --strategies naive,ewc has it" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_at_a_known_point_then_rerun_resumes_and_equals_an_uninterrupted_comparison(tiny_args, tmp_path):
    script = Path(sys.executable).parent / "clbench"
    plugin = Path(__file__).parent / "plugins" / "counting.py"
    command = [str(script), "compare", "--strategies", f"naive,{plugin}:Blocking,ewc", "--name", "killed",
               "--bounds", "none", *flags(tiny_args)]
    folder = Path(tiny_args["out"]) / "killed"
    marker = tmp_path / "blocked-in-stage-2"
    env = {**os.environ, "CLBENCH_TEST_BLOCK": str(marker)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env=env)
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the comparison never reached the blocking cell's stage 2"
    os.killpg(process.pid, signal.SIGKILL)                 # certain: the process is waiting in stage 2
    process.wait()
    naive_done = folder / "runs" / "naive-seed0" / "done.json"
    assert naive_done.exists() and not (folder / "runs" / "blocking-seed0" / "done.json").exists()
    assert sorted(pd.read_csv(folder / "runs" / "blocking-seed0" / "metrics.csv")["stage"].unique()) == [0, 1]
    stamp = naive_done.stat().st_mtime_ns
    blocked_stage1 = folder / "runs" / "blocking-seed0" / "checkpoints" / "stage1.pt"
    stage1_stamp = blocked_stage1.stat().st_mtime_ns
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)   # no marker: nothing blocks
    assert result.returncode == 0, result.stderr
    assert naive_done.stat().st_mtime_ns == stamp         # the finished cell was not redone
    assert blocked_stage1.stat().st_mtime_ns == stage1_stamp    # the unfinished one kept its finished stage
    resumed = json.loads((folder / "runs" / "blocking-seed0" / "resume.json").read_text())
    assert [r["resumed_after_stage"] for r in resumed] == [1]
    other = tmp_path / "uninterrupted"
    assert main([*command[1:-len(flags(tiny_args))], *flags(tiny_args, out=other)]) == 0   # in this process
    assert (folder / "summary.md").read_text() == (other / "killed" / "summary.md").read_text()
    for cell in ("naive-seed0", "blocking-seed0", "ewc-seed0"):
        assert (folder / "runs" / cell / "metrics.csv").read_bytes() == \
            (other / "killed" / "runs" / cell / "metrics.csv").read_bytes()


def test_reference_runs_give_a_drop_for_every_task(tiny_args, capsys):
    assert main(["compare", "--strategies", "naive", "--reference", "single-task", "--definition", "reference",
                 *flags(tiny_args)]) == 0
    folder = compare_folder(tiny_args)
    assert sorted(p.name for p in (folder / "reference").iterdir()) == ["cls-seed0", "det-seed0", "seg-seed0"]
    table = pd.read_csv(folder / "summary.csv")
    assert "n/a" not in table.iloc[0]["Classification (Top-1)"]
    capsys.readouterr()
    assert main(["table", str(folder), "--definition", "reference", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("Strategy,Segmentation (mIoU)")


def test_table_plot_and_eval_on_a_run_folder(tiny_args, capsys):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "one"}))
    assert main(["table", str(run_dir), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out
    assert main(["table", str(run_dir), "--definition", "reference"]) == 2
    assert main(["plot", str(run_dir)]) == 0
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["bn_drift.png", "drop_percent.png", "metric_by_stage.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    capsys.readouterr()
    assert main(["eval", "--weights", str(run_dir / "checkpoints" / "stage3.pt"), "--data-root",
                 tiny_args["data_root"], "--tasks", "all", "--device", "cpu"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    rows = pd.read_csv(run_dir / "metrics.csv")
    final = rows[rows.stage == 3].set_index(["eval_task", "metric"])["value"]
    assert printed["det"] == f"mAP {final[('det', 'mAP')]:.4f}" and printed["cls"] == f"top1 {final[('cls', 'top1')]:.4f}"
    assert printed["seg"] == f"mIoU {final[('seg', 'mIoU')]:.4f}"


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "w.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["eval", "--weights", str(bogus)]) == 2
    assert "w.pt: not a loadable checkpoint" in capsys.readouterr().err


def test_the_stage_1_cache_key_changes_with_every_setting_that_changes_stage_1():
    from clbench.compare import stage1_key
    base = resolve(None, {})
    assert stage1_key(base) == stage1_key(resolve(None, {"strategy": "ewc", "run_id": "x", "set": {"ewc.lam": "3"}}))
    for change in ({"workers": "2"}, {"epochs": "seg=5,det=6,cls=3"}, {"seed": "1"}, {"augment": "true"}, {"image_size": "96"}):
        assert stage1_key(resolve(None, change)) != stage1_key(base), change
    for later in ({"epochs": "cls=9"}, {"lr": "det=0.01"}, {"augment": "det=true"}, {"batch_size": "cls=3"}):
        assert stage1_key(resolve(None, later)) == stage1_key(base), later   # stage 1 trains seg only


def test_the_default_comparison_is_the_one_the_readme_shows():
    import re
    from pathlib import Path

    from clbench.cli import DEFAULT_STRATEGIES, build_parser
    args = build_parser().parse_args(["compare"])
    assert args.strategies == DEFAULT_STRATEGIES
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("## What it finds")]
    rows = re.findall(r"^\| (\S+) +\| [-+0-9.]+%", quick, flags=re.MULTILINE)
    assert rows == DEFAULT_STRATEGIES.split(",")
    assert re.search(r"^\| joint \(all tasks at once\) +\| final [0-9.]+ ", quick, flags=re.MULTILINE)  # the default bound
    assert "| ACC " in quick and "| BWT " in quick
