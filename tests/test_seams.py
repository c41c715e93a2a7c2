"""The contract between the loop, strategies, configuration and the results files."""

import dataclasses
import pickle
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import compare_flags as flags

from clbench import ClbenchError
from clbench.cli import main
from clbench.config import RunConfig, resolve
from clbench.plugins import create
from clbench.recorder import Recorder
from clbench.run import run
from clbench.strategy import Strategy
from clbench.testing import smoke_test

PLUGIN = Path(__file__).parent / "plugins" / "counting.py"



# stage-1 sharing -------------------------------------------------------------------------------------------

def test_an_undeclared_plugin_that_records_stage_1_gets_the_same_metrics_from_compare_as_from_run(tiny_args, tmp_path):
    spec = f"{PLUGIN}:Counting"
    assert main(["compare", "--strategies", f"naive,{spec}", "--name", "c", *flags(tiny_args)]) == 0
    cell = Path(tiny_args["out"]) / "c" / "runs" / "counting-seed0"   # named after the registered name
    alone = run(resolve(None, {**tiny_args, "strategy": spec, "run_id": "counting-seed0", "out": str(tmp_path / "a")}))
    assert (cell / "metrics.csv").read_bytes() == (alone / "metrics.csv").read_bytes()
    assert torch.load(cell / "checkpoints" / "stage3.pt", weights_only=True)["strategy"]["steps"] == 3  # 12 images / 4


def test_smoke_test_catches_a_false_stage_1_declaration(tmp_path):
    from clbench.plugins import find
    counting = find(f"{PLUGIN}:Counting").cls

    class Liar(counting):
        """Records stage 1 but claims it does not."""
        shares_first_stage = True

    with pytest.raises(ClbenchError, match="declares shares_first_stage, but a run from a stage-1 cache"):
        smoke_test(Liar, workdir=tmp_path)


def test_builtins_that_share_stage_1_say_so_and_the_default_is_not_to():
    assert Strategy.shares_first_stage is False
    shared = {name: create(name, {})[0].shares_first_stage for name in
              ("naive", "freeze_restore", "lwf", "bn_frozen", "ewc", "replay", "bn_per_task", "mas", "der", "agem", "pod")}
    assert all(shared.values())
    assert create("si", {})[0].shares_first_stage is False   # it integrates every step, stage 1 included
    assert create("bn_frozen", {"bn_frozen.from_stage": "1"})[0].shares_first_stage is False
    assert "shares_first_stage" in Strategy.__doc__ and "cached stage 1" in Strategy.__doc__


def test_replay_draws_its_buffer_from_the_run_seed(tiny_args, tmp_path):
    buffers = []
    for seed in ("0", "1"):
        run_dir = run(resolve(None, {**tiny_args, "strategy": "replay", "seed": seed, "run_id": f"r{seed}"}))
        buffers.append(torch.load(run_dir / "checkpoints" / "stage1.pt", weights_only=True)["strategy"]["buffer"])
    assert not torch.equal(buffers[0]["seg"]["indices"], buffers[1]["seg"]["indices"])


# configuration ---------------------------------------------------------------------------------------------

def test_cli_set_merges_per_key_with_the_yaml_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("set: {lwf.temperature: 3, lwf.lam: 1}\n")
    assert dict(resolve(cfg, {"set": ["lwf.lam=2"]}).set) == {"lwf.temperature": 3, "lwf.lam": "2"}


def test_a_config_built_in_code_is_validated_and_immutable():
    with pytest.raises(ClbenchError, match=r"RunConfig.lr: lr = .*expected a finite number"):
        RunConfig(lr={"seg": float("inf"), "det": 1e-3, "cls": 1e-3})
    with pytest.raises(ClbenchError, match="RunConfig.workers: workers = -1: expected a number >= 0"):
        RunConfig(workers=-1)
    config = RunConfig(epochs=2)                                    # normalised like the CLI's "2"
    assert dict(config.epochs) == {"seg": 2, "det": 2, "cls": 2}
    with pytest.raises(TypeError, match="immutable"):
        config.epochs["seg"] = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3
    assert pickle.loads(pickle.dumps(config)) == config
    assert yaml.safe_load(yaml.safe_dump(config.to_dict()))["epochs"] == {"seg": 2, "det": 2, "cls": 2}


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr: lr = 'nan': expected a finite number"),
    ("--lr", "inf", "--lr: lr = 'inf': expected a finite number"),
    ("--weight-decay", "-1", "--weight-decay: weight_decay = '-1': expected a number >= 0"),
    ("--workers", "-1", "--workers: workers = '-1': expected a number >= 0"),
    ("--grad-clip", "inf", "--grad-clip: grad_clip = 'inf': expected a finite number"),
    ("--seed", "-3", "--seed: seed = '-3': expected a number >= 0"),
    ("--epochs", "2.5", "--epochs: epochs = '2.5'"),
    ("--run-id", "../escaped", "--run-id: run_id = '../escaped': expected a plain name"),
    ("--run-id", "a/b", "--run-id: run_id = 'a/b': expected a plain name"),
])
def test_bad_numbers_and_names_are_one_line_exit_2(flag, value, message, capsys, tmp_path):
    assert main(["run", flag, value, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clbench: error: {message}") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_every_run_flag_reaches_compare_without_a_hand_kept_list(tiny_args):
    from clbench.cli import build_parser
    from clbench.config import FIELDS
    parser = build_parser()
    compare = parser._subparsers._group_actions[0].choices["compare"]  # noqa: SLF001
    dests = {a.dest for a in compare._actions}  # noqa: SLF001
    assert {n for n, f in FIELDS.items() if not f.metadata.get("per_cell")} <= dests
    assert not {"strategy", "seed", "run_id"} & dests


# recorder --------------------------------------------------------------------------------------------------

def test_two_runs_with_one_run_id_cannot_both_claim_the_folder(tmp_path):
    outcomes = []

    def claim():
        try:
            Recorder.create(tmp_path, "same", {}, {"config.yaml": "x: 1\n"})
            outcomes.append("claimed")
        except ClbenchError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("claimed") == 1 and all("already exists" in o for o in outcomes if o != "claimed")


def test_a_failed_start_leaves_no_half_made_run_folder(tiny_args, monkeypatch):
    import clbench.recorder as recorder
    real = recorder.atomic_write

    def fail_on_env(path, data):
        if path.name == "env.json":
            raise ClbenchError(f"{path}: could not write (No space left on device); nothing was written")
        real(path, data)

    monkeypatch.setattr(recorder, "atomic_write", fail_on_env)
    with pytest.raises(ClbenchError, match="No space left"):
        run(resolve(None, {**tiny_args, "run_id": "half"}))
    assert not (Path(tiny_args["out"]) / "half").exists()


# tasks by name and kind ------------------------------------------------------------------------------------

def renamed_run(folder: Path) -> Path:
    """A run folder whose tasks are two segmentation tasks with their own names, and one detection task."""
    import json
    tasks = [{"name": "voc_a", "kind": "seg", "dataset": "A", "classes": ["bg", "x"]},
             {"name": "coco", "kind": "det", "dataset": "C", "classes": ["p"], "category_ids": [1]},
             {"name": "voc_b", "kind": "seg", "dataset": "B", "classes": ["bg", "y"]}]
    values = {0: (0.1, 0.0, 0.1), 1: (0.8, 0.0, 0.1), 2: (0.6, 0.4, 0.1), 3: (0.4, 0.2, 0.7)}
    metric = {"voc_a": "mIoU", "coco": "mAP", "voc_b": "mIoU"}
    rows = [{"run_id": "r", "benchmark": "b", "strategy": "naive", "seed": 0, "stage": s,
             "stage_task": "none" if s == 0 else tasks[s - 1]["name"], "eval_task": t["name"],
             "metric": metric[t["name"]], "value": v, "direction": "higher", "n": 4}
            for s, vs in values.items() for t, v in zip(tasks, vs)]
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (folder / "tasks.json").write_text(json.dumps(tasks))
    return folder


def test_table_and_plot_take_tasks_from_the_run_not_from_a_literal(tmp_path, capsys):
    folder = renamed_run(tmp_path / "renamed")
    assert main(["table", str(folder), "--format", "csv"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert table["Task"].tolist() == ["voc_a (Segmentation)", "coco (Detection)", "voc_b (Segmentation)"]
    assert table["Drop (%)"].tolist() == ["-50.00%", "-50.00%", "undefined (trained last)"]
    assert main(["plot", str(folder)]) == 0
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["drop_percent.png", "metric_by_stage.png"]


def test_cached_test_sets_are_read_in_this_process_so_the_cache_holds_with_workers(tiny_args):
    from clbench.build import prepare
    from clbench.memory import MemoryLoader
    from clbench.runtime import MemoryCache, Session
    from clbench.stage import stage_context
    setup = prepare(resolve(None, {**tiny_args, "workers": "2"}), Session())
    assert [loader.num_workers for loader in setup.test_loaders] == [0, 0, 0]
    cache = setup.test_loaders[2].dataset._datasets[0]  # noqa: SLF001 — the AvalancheDataset's one dataset
    assert isinstance(cache, MemoryCache) and len(cache.items) == len(cache)   # filled here (chance levels)
    items = dict(cache.items)
    list(setup.test_loaders[2])                           # a pass reads the cache: nothing is decoded again
    assert all(cache.items[k] is v for k, v in items.items())
    ctx = stage_context(setup, 1, next(iter(setup.stream.train_stream)))
    assert isinstance(ctx.train_loader, MemoryLoader)     # the training set is decoded once: no workers needed
    per_image = prepare(resolve(None, {**tiny_args, "workers": "2", "train_in_memory_mb": "0"}), Session())
    ctx = stage_context(per_image, 1, next(iter(per_image.stream.train_stream)))
    assert ctx.train_loader.num_workers == 2              # image by image, training uses the workers asked for
