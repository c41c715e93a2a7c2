"""The Ray executor's cost: the same comparison with the sequential executor and with `--executor ray`.

Runs `clbench compare` twice in fresh folders (the default comparison unless told otherwise): sequentially
with torch's default threads, then on a local Ray instance with `--cell-cpus 1` (on 2 cores: two cells at a
time, one thread each). Also times Ray's fixed start-up (init + one trivial task + shutdown) on its own.
Prints wall times, the ratio ray / sequential (target <= 1.10 on this 2-core machine; on a many-core or
many-GPU machine it is what makes the grid parallel) and writes JSON.

    python perf/bench_ray.py [--strategies naive,bn_per_task+freeze_restore] [--seeds 0] [--bounds joint]
                             [--cell-cpus 1] [--json perf/bench_ray.json] [-- extra compare flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def startup_seconds() -> float:
    """ray.init of a local loopback instance, one trivial task, shutdown: in a fresh process."""
    code = ("import os, time; from clbench.executors import LOCAL_ENV; os.environ.update(LOCAL_ENV); t = time.perf_counter();"
            "import ray; ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, "
            "_node_ip_address='127.0.0.1'); ray.get(ray.remote(lambda: 1).remote()); ray.shutdown(); "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def timed_compare(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clbench", "compare", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--bounds", default="joint")
    parser.add_argument("--cell-cpus", default="1")
    parser.add_argument("--json", type=Path, default=Path("perf/bench_ray.json"))
    args, extra = parser.parse_known_args()
    common = ["--seeds", args.seeds, "--bounds", args.bounds, "--progress", "false", *extra]
    if args.strategies:
        common += ["--strategies", args.strategies]
    startup = startup_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        sequential = timed_compare([*common, "--out", os.path.join(tmp, "sequential")])
        ray = timed_compare([*common, "--out", os.path.join(tmp, "ray"), "--executor", "ray",
                             "--cell-cpus", args.cell_cpus])
    result = {"cores": os.cpu_count(), "sequential_seconds": sequential, "ray_seconds": ray,
              "ratio_ray_over_sequential": ray / sequential, "ray_startup_seconds": startup,
              "target_ratio": 1.10, "settings": common + ["--cell-cpus", args.cell_cpus]}
    print(f"cores {result['cores']}; sequential {sequential:.1f} s; ray (--cell-cpus {args.cell_cpus}) {ray:.1f} s; "
          f"ratio {result['ratio_ray_over_sequential']:.3f} (target <= 1.10); Ray start-up alone {startup:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
