import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from clbench import ClbenchError
from clbench.config import resolve
from clbench.model import UniHeadNet
from clbench.results import METRIC_COLUMNS
from clbench.run import run
from clbench.strategy import REGISTRY, Strategy, register


def test_three_stage_run_writes_every_file_with_the_right_schema(tiny_args):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "r1"}))
    assert sorted(p.name for p in run_dir.iterdir()) == ["bn_drift.csv", "bootstrap.csv", "chance.json", "checkpoints",
                                                         "config.yaml", "env.json", "metrics.csv", "per_class.csv",
                                                         "predictions", "resources.json", "tasks.json"]
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert tuple(rows.columns) == METRIC_COLUMNS
    assert sorted(rows["stage"].unique()) == [0, 1, 2, 3]
    assert rows.groupby("stage")["stage_task"].first().tolist() == ["none", "seg", "det", "cls"]
    primary = rows[rows["metric"].isin(["mIoU", "mAP", "top1"])]
    assert len(primary) == 4 * 3                      # every task after every stage
    assert set(rows["direction"]) == {"higher"} and set(rows["n"]) == {10}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["backbone"] == "test_efficientnet" and saved["epochs"] == {"seg": 1, "det": 1, "cls": 1}
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and set(env["data"]) == {"seg", "det", "cls"} and len(env["data"]["det"]["sha256"]) == 64
    assert env["seeding"]["torch"] == 0
    ckpt = torch.load(run_dir / "checkpoints" / "stage3.pt", weights_only=True)
    assert ckpt["stage"] == 3 and ckpt["task"] == "cls"
    from clbench.benchmarks import load_tasks
    specs = [t.spec for t in load_tasks(tiny_args["data_root"], ("seg", "det", "cls"), image_size=64)]
    UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=16).load_state_dict(ckpt["model"])
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == [f"stage{k}_det.json" for k in range(4)]


def test_saved_predictions_rescore_to_the_reported_map_with_pycocotools(tiny_args):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    run_dir = run(resolve(None, {**tiny_args, "run_id": "rescore", "epochs": "det=3,seg=1,cls=1"}))
    rows = pd.read_csv(run_dir / "metrics.csv")
    reported = rows[(rows.stage == 2) & (rows.eval_task == "det") & (rows.metric == "mAP")]["value"].item()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(Path(tiny_args["data_root"]) / "mini_coco_det" / "val" / "annotations.json"))
        ev = COCOeval(gt, gt.loadRes(str(run_dir / "predictions" / "stage2_det.json")), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert reported == pytest.approx(ev.stats[0], abs=1e-12)
    per_class = pd.read_csv(run_dir / "per_class.csv")
    ap = per_class[(per_class.stage == 2) & (per_class.metric == "AP")]
    assert len(ap) == 10 and set(per_class[per_class.metric == "IoU"]["class"]) == {
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle"}


def test_bn_audit_and_resource_report(tiny_args):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "audit", "latency_sizes": "256,512"}))
    drift = pd.read_csv(run_dir / "bn_drift.csv")
    assert set(zip(drift.stage, drift.reference_stage)) == {(2, 1), (3, 1), (3, 2)}
    assert (drift.distance >= 0).all() and (drift.distance > 0).any()
    rows = pd.read_csv(run_dir / "metrics.csv")
    own = rows[rows.metric.str.endswith("_own_bn")]
    # re-evaluated after the last stage only: the drop (and its attribution) is the last stage's
    assert set(zip(own.stage, own.eval_task, own.metric)) == {(3, "seg", "mIoU_own_bn"), (3, "det", "mAP_own_bn")}
    report = json.loads((run_dir / "resources.json").read_text())
    assert set(report["latency_ms"]) == {"seg", "det", "cls"} and set(report["latency_ms"]["det"]) == {"256", "512"}
    det_budget = next(b for b in report["budgets"] if b["budget"].startswith("det inference"))
    assert det_budget["value"] == round(report["latency_ms"]["det"]["512"], 2) > 0
    assert report["stages"]["1"]["parameters"]["total"] == report["stages"]["3"]["parameters"]["total"]
    for stage in report["stages"].values():
        total = stage["train_seconds"] + stage["eval_seconds"] + stage["bn_audit_seconds"]
        assert stage["eval_share"] == pytest.approx(stage["eval_seconds"] / total)
        assert stage["eval_and_bn_audit_share"] == pytest.approx((stage["eval_seconds"] + stage["bn_audit_seconds"]) / total)
    assert report["eval_seconds"] == pytest.approx(sum(s["eval_seconds"] for s in report["stages"].values()))
    assert report["budgets"][0]["pass"] is True and report["memory"]["process_peak_rss_mb"] > 0


def test_same_seed_with_loader_workers_and_augmentation_is_bit_identical(tiny_args, tmp_path):
    args = {**tiny_args, "run_id": "workers", "workers": "2", "augment": "true"}
    first = run(resolve(None, {**args, "out": str(tmp_path / "a")}))
    second = run(resolve(None, {**args, "out": str(tmp_path / "b")}))
    assert (first / "metrics.csv").read_bytes() == (second / "metrics.csv").read_bytes()


def test_same_seed_gives_a_bit_identical_metrics_csv(tiny_args, tmp_path):
    first = run(resolve(None, {**tiny_args, "run_id": "same", "out": str(tmp_path / "a")}))
    second = run(resolve(None, {**tiny_args, "run_id": "same", "out": str(tmp_path / "b")}))
    assert (first / "metrics.csv").read_bytes() == (second / "metrics.csv").read_bytes()
    other = run(resolve(None, {**tiny_args, "run_id": "same", "seed": "1", "out": str(tmp_path / "c")}))
    assert (first / "metrics.csv").read_bytes() != (other / "metrics.csv").read_bytes()


def test_an_existing_run_folder_is_never_overwritten(tiny_args, tmp_path):
    run_dir = tmp_path / "results" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("precious\n")
    with pytest.raises(ClbenchError, match="taken: already exists"):
        run(resolve(None, {**tiny_args, "run_id": "taken"}))
    assert (run_dir / "metrics.csv").read_text() == "precious\n"


@pytest.fixture
def exploding_strategy():
    @register("test_explodes_in_stage_2")
    class Explodes(Strategy):
        """Returns a NaN loss term in stage 2."""

        def loss_term(self, ctx, images, outputs):
            return torch.tensor(float("nan")) if ctx.stage == 2 else None

    yield "test_explodes_in_stage_2"
    REGISTRY.pop("test_explodes_in_stage_2")


def test_non_finite_loss_fails_loudly_and_keeps_finished_stages(tiny_args, exploding_strategy):
    with pytest.raises(ClbenchError, match=r"stage 2 \(det\), epoch 1, step 1: loss is nan"):
        run(resolve(None, {**tiny_args, "run_id": "nan", "strategy": exploding_strategy}))
    run_dir = Path(tiny_args["out"]) / "nan"
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(rows["stage"].unique()) == [0, 1]
    assert (run_dir / "checkpoints" / "stage1.pt").exists() and not (run_dir / "checkpoints" / "stage2.pt").exists()


@pytest.mark.slow
def test_cli_run_prints_the_report_table(tiny_args, tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**tiny_args, "run_id": "cli"}.items()]
    script = Path(sys.executable).parent / "clbench"  # the installed console script, run outside the checkout
    out = subprocess.run([str(script), "run", *flags], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    assert header == ["Task", "Metric", "Stage 1", "Stage 2", "Stage 3", "Strategy", "Drop (%)", "Within 5",
                      "BN drift / weights (pp)"]
    assert any(line.startswith("| Detection") and "mAP@[.5:.95]" in line for line in lines)
    assert "undefined (trained last)" in out.stdout
    report = json.loads((Path(tiny_args["out"]) / "cli" / "resources.json").read_text())
    shares = " / ".join(f"{100 * s['eval_share']:.1f}%" for s in report["stages"].values())
    assert f"({100 * report['eval_share']:.1f}% of stage time; per stage {shares})" in out.stdout


@pytest.mark.slow
def test_the_loop_benchmark_script_still_runs():
    """perf/ scripts print figures and are not timed here; this only keeps them in step with the API."""
    script = Path(__file__).resolve().parent.parent / "perf" / "bench_loop.py"
    out = subprocess.run([sys.executable, str(script), "--batches", "1", "--batch-size", "2", "--repeats", "1",
                          "--image-size", "64", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ratio clbench/bare:" in out.stdout


def test_two_tasks_of_one_kind_run_under_their_own_names(tiny_root, tiny_args, tmp_path, capsys):
    """A task is a name with a kind (and a folder): two segmentation tasks, one from a second folder, each with its
    own slice, rows, per-task settings and `clbench eval`."""
    import shutil

    from clbench.checkpoint import evaluate_checkpoint
    from clbench.cli import main
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    shutil.copytree(data / "mini_voc_seg", data / "voc_extra")
    args = {**tiny_args, "data_root": str(data), "tasks": "first=seg,det=det,second=seg:voc_extra",
            "order": "first,det,second", "epochs": "first=1,det=1,second=2", "run_id": "two-seg"}
    assert main(["run", *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]) == 0
    run_dir = tmp_path / "results" / "two-seg"
    tasks = json.loads((run_dir / "tasks.json").read_text())
    assert [(t["name"], t["kind"], t.get("folder")) for t in tasks] == [("first", "seg", None), ("det", "det", None),
                                                                     ("second", "seg", "voc_extra")]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["epochs"] == {"first": 1, "det": 1, "second": 2}
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert set(rows.eval_task) == {"first", "det", "second"} and list(rows.stage_task.unique()) == ["none", "first",
                                                                                                "det", "second"]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["data"]["second"]["path"] == str(data / "voc_extra")
    ckpt = torch.load(run_dir / "checkpoints" / "stage3.pt", weights_only=True)
    assert [t["name"] for t in ckpt["tasks"]] == ["first", "det", "second"]
    out = capsys.readouterr().out
    assert "| first (Segmentation) " in out and "| second (Segmentation) " in out
    final = rows[(rows.stage == 3) & (rows.metric == "mIoU")].set_index("eval_task")["value"]
    served = evaluate_checkpoint(run_dir / "checkpoints" / "stage3.pt", data, "second,first", "cpu")
    assert served == {"second": {"mIoU": pytest.approx(final["second"], abs=1e-9)},
                      "first": {"mIoU": pytest.approx(final["first"], abs=1e-9)}}


def test_python_dash_m_clbench_is_the_command_line():
    from clbench import __version__
    result = subprocess.run([sys.executable, "-m", "clbench", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"clbench {__version__}"
    result = subprocess.run([sys.executable, "-m", "clbench", "stategies"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'stategies'" in result.stderr


def test_a_runs_peak_memory_is_its_own_not_an_earlier_ones(tiny_args):
    """A comparison runs its cells in one process: each cell's peak RSS must not be the highest peak of the cells
    before it (the process's lifetime peak, which ru_maxrss reports, can only grow)."""
    import resource

    import numpy as np

    from clbench.resources import RUN_PEAK
    ballast = np.ones(600 * 2**20, dtype=np.uint8)   # an earlier 'cell' that peaked 600 MB higher, then freed it
    del ballast
    earlier = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run_dir = run(resolve(None, {**tiny_args, "run_id": "peak"}))
    memory = json.loads((run_dir / "resources.json").read_text())["memory"]
    assert memory["peak_rss_is"] == RUN_PEAK
    assert earlier - memory["process_peak_rss_mb"] > 300
