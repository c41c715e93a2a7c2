"""Issue 11: the joint and frozen bounds, --grid with its best-setting pick, ACC/BWT beside the drop, the
stability-plasticity plot and the shared-domain synthetic benchmark."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_settings, write_views

from clbench.cli import main
from clbench.compare import CompareSettings, cells, compare
from clbench.config import resolve
from clbench.joint import share
from clbench.plots import SKIPPED, pareto_front

PRIMARY = {"seg": "mIoU", "det": "mAP", "cls": "top1"}


def finals(run_dir: Path) -> dict[str, float]:
    """Each task's primary metric after the run's last stage, read straight from metrics.csv."""
    rows = pd.read_csv(run_dir / "metrics.csv")
    last = rows[rows.stage == rows.stage.max()]
    return {t: float(last[(last.eval_task == t) & (last.metric == m)].value.iloc[0]) for t, m in PRIMARY.items()}


def primary(run_dir: Path, stage: int, task: str) -> float:
    rows = pd.read_csv(run_dir / "metrics.csv")
    return float(rows[(rows.stage == stage) & (rows.eval_task == task) & (rows.metric == PRIMARY[task])].value.iloc[0])


@pytest.fixture(scope="module")
def grid_comparison(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_settings(tiny_root)
    settings = CompareSettings(strategies=("naive", "lwf"), seeds=(0,), reference=False, base=resolve(None, args),
                               bounds=("joint", "frozen"), grid=(("lwf.lam", ("0.5", "4")),))
    return write_views(compare(settings, out=tmp_path_factory.mktemp("grid"), name="grid", progress=False))


def test_joint_steps_spread_each_tasks_images_exactly():
    for images, steps in ((12, 9), (640, 130), (960, 130), (5, 7), (130, 130)):
        per_step = [share(i, images, steps) for i in range(steps)]
        assert sum(per_step) == images
        assert max(per_step) - min(per_step) <= 1 and min(per_step) == images // steps


def test_grid_cells_are_rows_labelled_by_setting(grid_comparison):
    assert sorted(p.name for p in (grid_comparison / "runs").iterdir()) == [
        "frozen-seed0", "lwf_lam=0.5-seed0", "lwf_lam=4-seed0", "naive-seed0"]
    for value in ("0.5", "4"):
        run = grid_comparison / "runs" / f"lwf_lam={value}-seed0"
        assert set(pd.read_csv(run / "metrics.csv").strategy) == {f"lwf[lam={value}]"}
        assert yaml.safe_load((run / "config.yaml").read_text())["set"]["lwf.lam"] == float(value)
    saved = yaml.safe_load((grid_comparison / "compare.yaml").read_text())
    assert saved["grid"] == {"lwf.lam": ["0.5", "4"]} and saved["bounds"] == ["joint", "frozen"]
    summary = (grid_comparison / "summary.md").read_text()
    assert "| lwf[lam=0.5] " in summary and "| lwf[lam=4] " in summary and "| frozen " in summary


def test_several_grid_keys_of_one_strategy_make_their_cross_product(tiny_args):
    settings = CompareSettings(strategies=("naive", "lwf"), seeds=(0, 1), reference=False,
                               base=resolve(None, tiny_args),
                               grid=(("lwf.lam", ("0.1", "1")), ("lwf.temperature", ("1", "2", "4"))))
    labels = [c.label for c in cells(settings) if c.seed == 1]
    assert labels[0] == "naive" and len(labels) == 7
    assert set(labels[1:]) == {f"lwf[lam={a},temperature={b}]" for a in ("0.1", "1") for b in ("1", "2", "4")}
    assert len({c.id for c in cells(settings)}) == 14


def test_joint_bound_has_the_sequential_budget_and_the_same_start(grid_comparison):
    joint = grid_comparison / "bounds" / "joint-seed0"
    info = json.loads((joint / "joint.json").read_text())
    assert info["steps"] == 9 and info["sequential_steps"] == {"seg": 3, "det": 3, "cls": 3}  # 12 images, batch 4
    assert info["images_seen"] == {"seg": 12, "det": 12, "cls": 12}
    rows = pd.read_csv(joint / "metrics.csv")
    assert sorted(rows.stage.unique()) == [0, 1] and set(rows[rows.stage == 1].stage_task) == {"joint"}
    assert set(rows.strategy) == {"joint"}
    naive = grid_comparison / "runs" / "naive-seed0"
    for task in PRIMARY:  # the same seed builds the same network: stage 0 is naive's stage 0
        assert primary(joint, 0, task) == primary(naive, 0, task)


def test_frozen_bound_serves_every_earlier_task_bit_identically(grid_comparison):
    run = grid_comparison / "runs" / "frozen-seed0"
    assert primary(run, 1, "seg") == primary(run, 2, "seg") == primary(run, 3, "seg")
    assert primary(run, 2, "det") == primary(run, 3, "det")
    naive = grid_comparison / "runs" / "naive-seed0"
    assert primary(run, 1, "seg") == primary(naive, 1, "seg")  # stage 1 is plain training (shared)


def test_summary_shows_acc_bwt_and_the_joint_row_computed_from_the_csvs(grid_comparison):
    table = pd.read_csv(grid_comparison / "summary.csv")
    naive = table[table.Strategy == "naive"].iloc[0]
    final = finals(grid_comparison / "runs" / "naive-seed0")
    assert float(naive["ACC"]) == pytest.approx(100 * sum(final.values()) / 3, abs=0.005)
    run = grid_comparison / "runs" / "naive-seed0"
    bwt = (final["seg"] - primary(run, 1, "seg") + final["det"] - primary(run, 2, "det")) / 2
    assert float(naive["BWT"]) == pytest.approx(100 * bwt, abs=0.005)
    joint = table[table.Strategy == "joint (all tasks at once)"].iloc[0]
    joint_final = finals(grid_comparison / "bounds" / "joint-seed0")
    assert joint["Segmentation (mIoU)"] == f"final {joint_final['seg']:.3f}"
    assert float(joint["ACC"]) == pytest.approx(100 * sum(joint_final.values()) / 3, abs=0.005)
    assert joint["BWT"] == "-"


def test_best_setting_is_picked_by_the_stated_criterion(grid_comparison, capsys):
    acc = {v: sum(finals(grid_comparison / "runs" / f"lwf_lam={v}-seed0").values()) for v in ("0.5", "4")}
    picked = json.loads((grid_comparison / "picked.json").read_text())
    assert picked["picked"] == {"lwf": f"lwf[lam={max(acc, key=acc.get)}]"} and picked["criterion"] == "acc"
    assert "on test" in picked["sentence"] and "(no --val-fraction, so no validation split)" in picked["sentence"]
    assert main(["table", str(grid_comparison), "--pick", "forgetting:plasticity>=1000"]) == 0
    assert "lwf: none (no setting reaches plasticity 1000%)" in capsys.readouterr().out
    assert main(["table", str(grid_comparison), "--pick", "best"]) == 2
    assert "--pick" in capsys.readouterr().err


def test_plasticity_without_references_is_against_joint(grid_comparison, capsys):
    assert main(["table", str(grid_comparison), "--definition", "plasticity", "--format", "csv"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    joint = table[table.Strategy == "joint (all tasks at once)"].iloc[0]
    joint_final, naive = finals(grid_comparison / "bounds" / "joint-seed0"), grid_comparison / "runs" / "naive-seed0"
    columns = {"seg": ("Segmentation (mIoU)", 1), "det": ("Detection (mAP@[.5:.95])", 2),
               "cls": ("Classification (Top-1)", 3)}
    checked = [t for t in columns if joint_final[t] > 0]   # plasticity is undefined against a zero reference
    assert checked, joint_final
    for task in checked:
        column, stage = columns[task]
        assert joint[column] == "+100.00%"
        naive_cell = table[table.Strategy == "naive"].iloc[0][column].split(";")[0]
        assert naive_cell == f"{100 * primary(naive, stage, task) / joint_final[task]:+.2f}%"


def test_stability_plasticity_plot_is_drawn_and_needs_a_reference(grid_comparison, tmp_path, capsys):
    assert main(["plot", str(grid_comparison)]) == 0
    assert (grid_comparison / "plots" / "stability_plasticity.png").stat().st_size > 10_000
    bare = tmp_path / "bare"
    shutil.copytree(grid_comparison, bare)
    shutil.rmtree(bare / "bounds")
    capsys.readouterr()
    assert main(["plot", str(bare)]) == 0
    assert SKIPPED in capsys.readouterr().out and not (bare / "plots" / "stability_plasticity.png").exists()


def test_pareto_front_by_hand():
    points = [(90.0, 30.0), (60.0, 0.0), (80.0, 40.0), (95.0, 35.0), (60.0, 5.0), (90.0, 30.0)]
    # (80, 40) is beaten by (90, 30); (60, 5) by (60, 0); the two (90, 30) do not beat each other
    assert pareto_front(points) == [True, True, False, True, False, True]


def test_rerunning_the_command_redoes_no_cell_and_no_bound(grid_comparison, tiny_root):
    stamps = {p: p.stat().st_mtime_ns for p in grid_comparison.glob("*/*/metrics.csv")}
    args = tiny_settings(tiny_root)
    settings = CompareSettings(strategies=("naive", "lwf"), seeds=(0,), reference=False, base=resolve(None, args),
                               bounds=("joint", "frozen"), grid=(("lwf.lam", ("0.5", "4")),))
    compare(settings, out=grid_comparison.parent, name="grid", progress=False)
    assert len(stamps) == 5 and stamps == {p: p.stat().st_mtime_ns for p in stamps}


@pytest.mark.parametrize("extra, message", [
    (["--grid", "ewc.lam=1,2"], "--grid ewc.lam: no strategy of --strategies"),
    (["--grid", "lwf.lam=1,2", "--set", "lwf.lam=3"], "--grid lwf.lam and --set lwf.lam"),
    (["--grid", "lwf.lam=1,oops"], "lam"),
    (["--grid", "lwf.lam=1,1"], "a value repeats"),
    (["--grid", "lwf.lam"], "expected STRATEGY.PARAM=V1,V2"),
    (["--bounds", "joint,oracle"], "--bounds oracle"),
])
def test_bad_grid_and_bounds_are_one_line_errors_before_anything_trains(tiny_args, capsys, extra, message):
    args = ["compare", "--strategies", "naive,lwf", *extra] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny_args.items()]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not Path(tiny_args["out"]).exists() or not any(Path(tiny_args["out"]).iterdir())


def test_a_shared_domain_run_is_named_and_clbench_eval_finds_its_data(tiny_args, tmp_path, capsys):
    args = {k: v for k, v in tiny_args.items() if k != "data_root"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    assert main(["run", *flags, "--synth-domain", "shared", "--synth-train", "12", "--synth-val", "10",
                 "--run-id", "shared"]) == 0
    run = Path(tiny_args["out"]) / "shared"
    assert set(pd.read_csv(run / "metrics.csv").benchmark) == {"synthetic-shared"}
    capsys.readouterr()
    assert main(["eval", "--weights", str(run / "checkpoints" / "stage3.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    final = finals(run)
    assert f"{final['cls']:.4f}" in out and f"{final['seg']:.4f}" in out
    assert not math.isnan(final["seg"])
