"""The `clbench` command line: run, data synth."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from clbench import ClbenchError, __version__
from clbench.config import add_arguments, resolve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clbench", allow_abbrev=False,
                                     description="Continual-learning benchmark harness for UniHeadNet.")
    parser.add_argument("--version", action="version", version=f"clbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", allow_abbrev=False, help="train seg -> det -> cls with one strategy, print the table")
    run.add_argument("--config", type=Path, default=None, help="YAML file; its keys mirror these flags")
    add_arguments(run)
    sub.add_parser("strategies", help="list every strategy found, its origin and hyperparameters")
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", allow_abbrev=False, help="write the synthetic benchmark in the real formats")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=160)
    synth.add_argument("--n-val", type=int, default=40)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but an unknown flag names the closest known one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser._subparsers._group_actions[0].choices.get(args.command)  # noqa: SLF001 — argparse has no API
        known = [opt for action in sub._actions for opt in action.option_strings]  # noqa: SLF001
        hint = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        parser.error(f"unknown argument {unknown[0]!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "strategies":
            return _strategies()
        return _synth(args)
    except ClbenchError as exc:
        print(f"clbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clbench: interrupted; finished stages are kept in the run folder", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from clbench.run import run, summary
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = resolve(args.config, given)
    run_dir = run(config)
    print(summary(run_dir))
    print(f"\nresults: {run_dir}")
    return 0


def _strategies() -> int:
    from clbench.plugins import available
    from clbench.strategy import hyperparameters
    for name, found in sorted(available().items()):
        print(f"{name}  [{found.origin}]\n    {found.cls.description}")
        for hp in hyperparameters(found.cls).values():
            default = ",".join(map(str, hp.default)) if isinstance(hp.default, tuple) else hp.default
            print(f"    --set {name}.{hp.name}={default}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from clbench.benchmarks.synthetic import SynthSpec, generate
    out = generate(args.out, SynthSpec(seed=args.seed, n_train=args.n_train, n_val=args.n_val))
    print(f"synthetic benchmark written to {out}")
    return 0
