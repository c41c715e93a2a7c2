"""`clbench compare --executor ray` on a local two-node Ray cluster bound to loopback only (head + one added node,
1 CPU each, started once for this module): the same results as the sequential executor, and the faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import compare_flags, tiny_settings, write_views

from clbench.executors import LOCAL_ENV, RayOptions

pytestmark = pytest.mark.slow   # Ray clusters: the fast lane (`pytest -m "not slow"`) leaves them out

STALL = str(Path(__file__).parent / "plugins" / "stall.py") + ":Stall"
CLBENCH = [sys.executable, "-m", "clbench"]


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:   # LOCAL_ENV only while this module's tests run
        for key, value in LOCAL_ENV.items():
            patch.setenv(key, value)                 # before ray is imported: every port on 127.0.0.1
        yield from _cluster()


def _cluster():
    ray = pytest.importorskip("ray", reason="the test extra installs ray (pip install \"clbench[ray]\")")
    from ray.cluster_utils import Cluster
    # a removed node is noticed within ~4 s instead of Ray's default ~20 s (health checks every 3 s, 5 misses)
    fast_health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                   "health_check_failure_threshold": 3}
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                         "_system_config": fast_health})
    node = head.add_node(num_cpus=1)
    head.wait_for_nodes()
    ray.init(address=head.address, log_to_driver=False)
    head.extra = node
    yield head
    ray.shutdown()
    head.shutdown()


def settings_args(tiny_root: Path) -> dict:
    return tiny_settings(tiny_root, image_size="48")


def command(tiny_root: Path, out: Path, strategies: str, *extra: str) -> list[str]:
    return [*CLBENCH, "compare", "--strategies", strategies, "--out", str(out), "--name", "c",
            *compare_flags(settings_args(tiny_root)), *extra]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def listening(pids: set[int]) -> list[str]:
    """The local addresses of every listening TCP socket the processes ``pids`` hold (from /proc, no tools)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                found.append(parts[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def run_compare(settings, out, options):
    from clbench.compare import compare
    return write_views(compare(settings, out=out, name="c", progress=False, executor=options))


def test_ray_gives_the_sequential_results_byte_for_byte_on_loopback_only(cluster, tiny_root, tmp_path):
    import torch

    from clbench.compare import CompareSettings
    from clbench.config import resolve
    settings = CompareSettings(strategies=("naive", "ewc"), seeds=(0,), reference=False,
                               base=resolve(None, settings_args(tiny_root)), bounds=("joint",))
    ray_folder = run_compare(settings, tmp_path / "ray", RayOptions(address=cluster.address, cell_cpus=1))
    addresses = listening(descendants(os.getpid()) | {os.getpid()})
    assert addresses and set(addresses) <= LOOPBACK, addresses   # no Ray port listens beyond 127.0.0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cells ran with 1 thread each (--cell-cpus 1): the same float reductions
    try:
        sequential = run_compare(settings, tmp_path / "sequential", None)
    finally:
        torch.set_num_threads(threads)
    cells = sorted(p.relative_to(sequential) for p in sequential.glob("*/*/metrics.csv"))
    assert len(cells) == 3 and cells == sorted(p.relative_to(ray_folder) for p in ray_folder.glob("*/*/metrics.csv"))
    for cell in cells:
        assert (ray_folder / cell).read_bytes() == (sequential / cell).read_bytes(), cell
    assert (ray_folder / "summary.csv").read_bytes() == (sequential / "summary.csv").read_bytes()
    nodes = {json.loads((p.parent / "executor.json").read_text())["node_id"] for p in ray_folder.glob("runs/*/done.json")}
    assert nodes <= {n["NodeID"] for n in __import__("ray").nodes()}
    assert json.loads((sequential / "runs" / "naive-seed0" / "executor.json").read_text())["executor"] == "sequential"
    assert (ray_folder / "compare.yaml").read_bytes() == (sequential / "compare.yaml").read_bytes()  # same settings
    assert len(list((ray_folder / "cache").glob("stage1-seed0-*.pt"))) == 1   # one stage-1 task, both cells used it
    saved = [json.loads((ray_folder / "runs" / c / "resources.json").read_text())["stages"]["1"]["seconds_saved_by_cache"]
             for c in ("naive-seed0", "ewc-seed0")]
    assert all(s > 0 for s in saved)


def cli_args(tiny_root: Path, out: Path, strategies: str, *extra: str) -> list[str]:
    return command(tiny_root, out, strategies, *extra)[len(CLBENCH):]


def in_background(args: list[str]) -> tuple[threading.Thread, list[int]]:
    """`clbench` run in this process (its Ray workers stay warm between tests), on a thread: the test can act
    while the comparison runs."""
    from clbench.cli import main
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)), daemon=True)
    thread.start()
    return thread, codes


def test_a_cell_that_raises_is_reported_once_not_retried_and_the_others_finish(cluster, tiny_root, tmp_path, capsys):
    from clbench.cli import main
    marker = tmp_path / "marker"
    code = main(cli_args(tiny_root, tmp_path / "out", f"naive,{STALL}", "--set", f"stall.marker={marker}", "--set",
                         "stall.mode=raise", "--executor", "ray", "--ray-address", cluster.address))
    err = capsys.readouterr().err
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: runs/stall-seed0: failed: RuntimeError: stall: a deliberate failure that would recur"]
    assert len((marker / "attempts").read_text().splitlines()) == 1   # not retried
    folder = tmp_path / "out" / "c"
    assert (folder / "runs" / "naive-seed0" / "done.json").exists()
    assert "Missing (not finished, not in the table): stall-seed0" in (folder / "summary.md").read_text()


def test_a_killed_worker_is_retried_once_and_leaves_no_process(cluster, tiny_root, tmp_path):
    marker = tmp_path / "marker"
    thread, codes = in_background(cli_args(tiny_root, tmp_path / "out", f"naive,{STALL}", "--set",
                                           f"stall.marker={marker}", "--executor", "ray", "--ray-address",
                                           cluster.address, "--retries", "1", "--workers", "1",
                                           "--train-in-memory-mb", "0"))   # image by image: a loader process
    stalled = wait_for(marker / "seed0", thread)
    pid = json.loads(stalled.read_text())["pid"]
    attempt = descendants(pid) | {pid}   # the worker and its data-loader process
    assert len(attempt) == 2
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert codes == [0]
    folder = tmp_path / "out" / "c"
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["naive-seed0", "stall-seed0"]
    where = json.loads((folder / "runs" / "stall-seed0" / "executor.json").read_text())
    assert where["pid"] != pid and (folder / "runs" / "stall-seed0" / "done.json").exists()
    time.sleep(1)
    assert not [p for p in attempt if Path(f"/proc/{p}").exists()], "a process of the killed attempt survived"


def test_a_killed_driver_resumes_with_the_same_command(cluster, tiny_root, tmp_path):
    marker = tmp_path / "marker"
    args = command(tiny_root, tmp_path / "out", f"naive,{STALL}", "--set", f"stall.marker={marker}", "--executor",
                   "ray", "--ray-address", cluster.address)
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "out" / "c"
    wait_for(marker / "seed0", driver)
    wait_for(folder / "runs" / "stall-seed0" / "checkpoints" / "stage1.pt", driver)
    wait_for(folder / "runs" / "naive-seed0" / "done.json", driver)
    driver.kill()
    driver.wait()
    finished = {p: p.stat().st_mtime_ns for p in (folder / "runs" / "naive-seed0").rglob("*") if p.is_file()}
    assert not (folder / "runs" / "stall-seed0" / "done.json").exists()
    from clbench.cli import main
    assert main(args[len(CLBENCH):]) == 0   # the same command again (in this process: its workers are warm)
    assert finished == {p: p.stat().st_mtime_ns for p in finished}   # the finished cell was not redone
    history = json.loads((folder / "runs" / "stall-seed0" / "resume.json").read_text())
    assert [h["resumed_after_stage"] for h in history] == [1]
    whole = uninterrupted(tiny_root, tmp_path / "whole", ("naive", STALL), {"stall.marker": str(marker)})
    from clbench.drop import DEFAULT_THRESHOLD
    from clbench.reader import ComparisonData
    from clbench.summary import write_summary
    write_summary(ComparisonData.load(whole), "drop", DEFAULT_THRESHOLD)   # as the command line writes it
    for name in ("summary.csv", "runs/naive-seed0/metrics.csv", "runs/stall-seed0/metrics.csv"):
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name


def uninterrupted(tiny_root: Path, out: Path, strategies: tuple[str, ...], options: dict) -> Path:
    """The same grid run sequentially in this process with one torch thread, as each Ray cell ran (the stall
    plugin's marker exists by then: it does not stall)."""
    import torch

    from clbench.compare import CompareSettings
    from clbench.config import resolve
    settings = CompareSettings(strategies=strategies, seeds=(0,), reference=False,
                               base=resolve(None, {**settings_args(tiny_root), "set": options}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_compare(settings, out, None)
    finally:
        torch.set_num_threads(threads)


def test_a_removed_node_reruns_its_cell_on_the_head(cluster, tiny_root, tmp_path):
    import ray
    marker = tmp_path / "marker"
    thread, codes = in_background(cli_args(tiny_root, tmp_path / "out", STALL, "--seeds", "0,1", "--set",
                                           f"stall.marker={marker}", "--executor", "ray", "--ray-address",
                                           cluster.address))
    for seed in (0, 1):   # one cell on each node (1 CPU each), both stalled in stage 2
        wait_for(marker / f"seed{seed}", thread)
    extra = cluster.extra.node_id
    on_extra = [s for s in (0, 1) if json.loads((marker / f"seed{s}").read_text())["node"] == extra]
    assert len(on_extra) == 1
    cluster.remove_node(cluster.extra)
    (marker / "release").touch()
    thread.join(timeout=300)
    assert codes == [0]
    head = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    folder = tmp_path / "out" / "c"
    where = json.loads((folder / "runs" / f"stall-seed{on_extra[0]}" / "executor.json").read_text())
    assert where["node_id"] in head and where["node_id"] != extra
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["stall-seed0", "stall-seed1"]
    cluster.extra = cluster.add_node(num_cpus=1)   # for any later test
    cluster.wait_for_nodes()


def wait_for(path: Path, process: subprocess.Popen | threading.Thread, seconds: float = 240) -> Path:
    deadline = time.time() + seconds
    while not path.exists():
        ended = process.poll() is not None if isinstance(process, subprocess.Popen) else not process.is_alive()
        if ended:
            detail = process.communicate()[1][-2000:] if isinstance(process, subprocess.Popen) else ""
            raise AssertionError(f"{path} never appeared: {detail}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    return path


def test_without_ray_the_executor_is_a_one_line_error(tiny_args, monkeypatch, capsys):
    from clbench.cli import main
    monkeypatch.setitem(sys.modules, "ray", None)
    args = ["compare", "--executor", "ray"] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny_args.items()]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "clbench[ray]"' in err
    assert main(["compare", "--cell-cpus", "2"] + args[3:]) == 2
    assert "--cell-cpus: applies to --executor ray only" in capsys.readouterr().err
