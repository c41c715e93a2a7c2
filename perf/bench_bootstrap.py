"""What the bootstrap intervals cost a run: the same run with --bootstrap 0 and with --bootstrap B, timed whole, with
the evaluation seconds resources.json records (the target: the intervals add at most 10% to a run's time).

    python perf/bench_bootstrap.py [--resamples 1000] [run options as KEY=VALUE, e.g. data_root=DATA pretrained=lite0]

Without options it times the default run (naive) on the synthetic benchmark.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from clbench.config import resolve
from clbench.run import run


def timed(settings: dict[str, str], out: Path, resamples: int) -> tuple[float, float]:
    start = time.perf_counter()
    run_dir = run(resolve(None, {**settings, "out": str(out), "run_id": f"b{resamples}", "bootstrap": str(resamples),
                                 "progress": "false", "latency_sizes": ""}))
    wall = time.perf_counter() - start
    stages = json.loads((run_dir / "resources.json").read_text())["stages"]
    return wall, sum(s["eval_seconds"] for s in stages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("settings", nargs="*", help="run options KEY=VALUE")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.settings)
    with tempfile.TemporaryDirectory() as out:
        bare_wall, bare_eval = timed(settings, Path(out), 0)
        wall, evaluation = timed(settings, Path(out), args.resamples)
    print(f"--bootstrap 0: {bare_wall:.1f} s (evaluation {bare_eval:.1f} s); --bootstrap {args.resamples}: {wall:.1f} s "
          f"(evaluation {evaluation:.1f} s); the intervals add {evaluation - bare_eval:.1f} s, "
          f"{100 * (evaluation - bare_eval) / bare_wall:.1f}% of the run (ratio {wall / bare_wall:.3f})")


if __name__ == "__main__":
    main()
