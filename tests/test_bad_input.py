"""Bad input ends in one line naming the file or flag, exit code 2, no traceback, nothing on disk changed."""

import errno
import fcntl
import json
import os
import shutil
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



def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("clbench: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def root(tiny_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(tiny_root, copy)
    return copy


def edit_coco(root, split, edit):
    path = root / "mini_coco_det" / split / "annotations.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def duplicate_first_image(data):
    data["images"].append(dict(data["images"][0]))


def reuse_first_id(data):
    data["images"][1]["id"] = data["images"][0]["id"]


@pytest.mark.parametrize("split, edit, message", [
    ("train", lambda d: d.update(images="img.jpg"), "'images' must be a list of objects, got str"),
    ("train", lambda d: d["annotations"][0].pop("bbox"), "has bbox None: expected [x, y, width, height]"),
    ("train", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "has bbox [1, 2, 3]: expected [x, y, width, height]"),
    ("val", lambda d: d["images"][0].pop("width"), "has no 'width': expected an integer"),
    ("train", lambda d: d["annotations"][0].update(bbox=[1, float("nan"), 3, 4]), "has bbox [1, nan, 3, 4]"),
    ("train", reuse_first_id, "appears twice in 'images' (ids must be unique)"),
    ("val", duplicate_first_image, "appears twice in 'images' (ids must be unique)"),
    ("val", lambda d: d["images"][0].update(file_name="bad\udcff.jpg"), "not valid UTF-8"),
])
def test_bad_coco_is_caught_by_verify_and_before_every_run(root, tiny_args, tmp_path, capsys, split, edit, message):
    path = edit_coco(root, split, edit)
    assert main(["data", "verify", str(root)]) == 2
    one_line_error(capsys, str(path), message)
    out = tmp_path / "out"
    assert main(["run", *flags(tiny_args, data_root=root, out=out)]) == 2
    one_line_error(capsys, str(path), message)
    assert not out.exists()


def test_a_file_name_that_is_not_utf8_is_refused(root, capsys):
    tench = root / "imagenette_160" / "train" / "tench"
    src = next(tench.iterdir())
    os.rename(src, os.path.join(os.fsencode(tench), b"bad\xff.jpg"))
    assert main(["data", "verify", str(root)]) == 2
    one_line_error(capsys, "is not valid UTF-8")


def test_an_empty_class_folder_is_refused(root, capsys):
    (root / "imagenette_160" / "train" / "zebra").mkdir()
    assert main(["data", "verify", str(root)]) == 2
    one_line_error(capsys, "zebra: class folder holds no images")


def test_a_symlink_loop_is_refused(root, capsys):
    (root / "imagenette_160" / "train" / "loop").symlink_to(root / "imagenette_160" / "train")
    assert main(["data", "verify", str(root)]) == 2
    one_line_error(capsys, "loop: a symlink loop")
    (root / "imagenette_160" / "train" / "loop").unlink()
    (root / "imagenette_160" / "train" / "self").symlink_to("self")
    assert main(["data", "verify", str(root)]) == 2
    one_line_error(capsys, "self: a broken symlink or a symlink loop")


# folders ---------------------------------------------------------------------------------------------------

def test_out_naming_an_existing_file_is_refused(tiny_args, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine\n")
    assert main(["run", *flags(tiny_args, out=target)]) == 2
    one_line_error(capsys, f"--out {target}: is a file")
    assert target.read_text() == "mine\n"


def test_out_on_a_read_only_file_system_is_refused(tiny_args, tmp_path, capsys, monkeypatch):
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["run", *flags(tiny_args, out=tmp_path / "ro")]) == 2
    one_line_error(capsys, "cannot create the run folder there (Read-only file system)")


def test_data_synth_never_touches_a_folder_with_the_users_files(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious\n")
    assert main(["data", "synth", "--out", str(folder), "--n-train", "2", "--n-val", "2"]) == 2
    one_line_error(capsys, "is a folder that is not empty")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "precious\n"
    assert main(["data", "synth", "--out", str(folder / "thesis.tex")]) == 2
    one_line_error(capsys, "is a file")


def test_a_strategy_given_as_a_path_gets_a_cell_named_after_it(tiny_args, tmp_path, capsys):
    plugin = tmp_path / "plugins" / "plain.py"
    plugin.parent.mkdir()
    plugin.write_text("from clbench.strategy import Strategy, register\n\n"
                      "@register('plain')\nclass Plain(Strategy):\n    '''Plain fine-tuning.'''\n")
    assert main(["compare", "--strategies", f"naive,{plugin}:Plain", "--name", "p", "--bounds", "none",
                 *flags(tiny_args)]) == 0
    folder = Path(tiny_args["out"]) / "p"
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["naive-seed0", "plain-seed0"]
    assert [p.name for p in plugin.parent.iterdir()] == ["plain.py"]          # nothing written next to the plugin
    assert pd.read_csv(folder / "summary.csv")["Strategy"].tolist() == ["naive", "plain"]


def test_the_summary_names_the_cells_that_are_missing(tiny_args, capsys):
    assert main(["compare", "--strategies", "naive,ewc", "--name", "m", "--bounds", "none", *flags(tiny_args)]) == 0
    folder = Path(tiny_args["out"]) / "m"
    (folder / "runs" / "ewc-seed0" / "done.json").unlink()
    capsys.readouterr()
    assert main(["table", str(folder)]) == 0
    assert "Missing (not finished, not in the table): ewc-seed0." in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("\x00\x01garbage,,\n\"unclosed\n", "not a clbench metrics table"),
    ("a,b\n1,2\n", "not a clbench metrics table: missing columns run_id"),
    ("run_id,benchmark,strategy,seed,stage,stage_task,eval_task,metric,value,direction,n\n", "has no rows"),
])
def test_table_on_a_bad_metrics_csv_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "metrics.csv").write_text(content)
    assert main(["table", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path / "metrics.csv"), message)
    assert main(["plot", str(tmp_path)]) == 2
    one_line_error(capsys, message)


def test_plot_on_a_bad_bn_drift_csv_is_one_line(tiny_args, capsys):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "drift"}))
    (run_dir / "bn_drift.csv").write_text("stage,layer\nx,y\n")
    assert main(["plot", str(run_dir)]) == 2
    one_line_error(capsys, "bn_drift.csv: not a clbench BN-drift table: missing columns")


def test_eval_on_a_checkpoint_whose_config_does_not_match_its_weights(tiny_args, tmp_path, capsys):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "e"}))
    ckpt = torch.load(run_dir / "checkpoints" / "stage3.pt", weights_only=True)
    ckpt["model_config"]["head_channels"] = 24
    torch.save(ckpt, tmp_path / "bad.pt")
    assert main(["eval", "--weights", str(tmp_path / "bad.pt"), "--data-root", tiny_args["data_root"],
                 "--device", "cpu"]) == 2
    one_line_error(capsys, "bad.pt: tensor 'lateral.0.weight' is (16, 32, 1, 1) in the checkpoint but (24, 32, 1, 1) in "
                           "the network its model_config describes")


# interruptions and failures while writing ------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_complete_files_and_says_so(tiny_args, monkeypatch, capsys):
    import clbench.results as results
    real, calls = results.os.replace, {"metrics": 0}

    def disk_fills(src, dst):
        if str(dst).endswith("metrics.csv"):
            calls["metrics"] += 1
            if calls["metrics"] == 3:  # stage 0 and stage 1 were written; stage 2's rewrite fails
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(results.os, "replace", disk_fills)
    assert main(["run", *flags(tiny_args, run_id="full")]) == 2
    one_line_error(capsys, "metrics.csv: could not write (No space left on device); the previous complete file is "
                           "unchanged")
    run_dir = Path(tiny_args["out"]) / "full"
    assert sorted(pd.read_csv(run_dir / "metrics.csv")["stage"].unique()) == [0, 1]
    assert not [p for p in run_dir.rglob("*.tmp")]                # no temporary file left behind


def test_a_stages_rows_are_written_only_after_its_checkpoint(tiny_args, monkeypatch, capsys):
    import clbench.recorder as recorder
    real = recorder.save_checkpoint

    def fail_stage_3(path, state):
        if path.name == "stage3.pt":
            raise recorder.ClbenchError(f"{path}: could not write (No space left on device); nothing was written")
        real(path, state)

    monkeypatch.setattr(recorder, "save_checkpoint", fail_stage_3)
    assert main(["run", *flags(tiny_args, run_id="ck")]) == 2
    one_line_error(capsys, "stage3.pt: could not write")
    run_dir = Path(tiny_args["out"]) / "ck"
    assert sorted(pd.read_csv(run_dir / "metrics.csv")["stage"].unique()) == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["stage1.pt", "stage2.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "compare"])
def test_sigint_prints_one_line_and_keeps_finished_stages(command, tiny_args, tmp_path):
    marker = tmp_path / "stage2"
    env = {**os.environ, "CLBENCH_TEST_BLOCK": str(marker)}
    spec = f"{Path(__file__).parent / 'plugins' / 'counting.py'}:Blocking"
    args = ["run", "--strategy", spec, "--run-id", "int"] if command == "run" else \
        ["compare", "--strategies", spec, "--name", "int"]
    # the child gets SIGINT's default disposition whatever this suite inherited (under nohup or as a background job
    # SIGINT is ignored, and an ignored signal stays ignored across exec)
    process = subprocess.Popen([CLBENCH, *args, *flags(tiny_args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.count("\n") == 1 and err.startswith("clbench: interrupted") and "Traceback" not in err, err
    run_dir = Path(tiny_args["out"]) / ("int" if command == "run" else "int/runs/blocking-seed0")
    assert sorted(pd.read_csv(run_dir / "metrics.csv")["stage"].unique()) == [0, 1]


def test_a_second_compare_on_a_locked_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tiny_args, capsys):
    folder = Path(tiny_args["out"]) / "locked"
    folder.mkdir(parents=True)
    with open(folder / "lock", "w") as held:                       # a live holder: this process
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("process 4242 on somewhere since then")
        held.flush()
        assert main(["compare", "--strategies", "naive", "--name", "locked", "--bounds", "none", *flags(tiny_args)]) == 2
        one_line_error(capsys, f"{folder}: in use by process 4242 on somewhere since then")
    assert sorted(p.name for p in folder.iterdir()) == ["lock"]     # nothing else was written
    # the holder is gone (its flock released with it): the lock is taken over
    assert main(["compare", "--strategies", "naive", "--name", "locked", "--bounds", "none", *flags(tiny_args)]) == 0
    assert (folder / "runs" / "naive-seed0" / "done.json").exists()
