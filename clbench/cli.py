"""The `clbench` command line: run, compare, table, plot, eval, report, strategies, data (synth, prepare, import,
download, verify)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from clbench import ClbenchError, __version__, did_you_mean
from clbench.config import FIELDS, RUN_ID, RunConfig, add_arguments, at_least, finite_float, resolve, run_fields, whole_number
from clbench.drop import DEFAULT_THRESHOLD, DEFINITIONS

# The default comparison is the baseline and the BN-drift remedy on the original report's method: what fits 5 minutes
# on 2 CPU cores (a third cell, der, took it to 319 s; docs/results.md, "What the table shows").
DEFAULT_STRATEGIES = "naive,bn_per_task+freeze_restore"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clbench", allow_abbrev=False,
                                     description="Continual-learning benchmark harness for UniHeadNet.")
    parser.add_argument("--version", action="version", version=f"clbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", allow_abbrev=False, help="train the tasks in order with one strategy, print the table")
    run.add_argument("--config", type=Path, default=None, help=(
        "YAML file, or the name of one clbench ships (e.g. real-mini: `clbench configs` lists them); its "
        "keys mirror these flags, and flags given beside it win"))
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue an interrupted run after its last finished stage (its own config.yaml)")
    add_arguments(run)
    _compare_parser(sub)
    _view_parsers(sub)
    sub.add_parser("strategies", help="list every strategy found, its origin and hyperparameters")
    sub.add_parser("configs", help="list the run configurations clbench ships (--config NAME)")
    sub.add_parser("benchmarks", help="list the benchmark files clbench ships (--protocol NAME): the experiences of "
                   "each, in order")
    _data_parsers(sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True))
    return parser


def _view_parsers(sub: argparse._SubParsersAction) -> None:
    """table, plot, report (views of a results folder) and eval (a checkpoint)."""
    table = sub.add_parser("table", allow_abbrev=False, help="the drop table of a run or comparison folder")
    table.add_argument("folder", type=Path)
    table.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    table.add_argument("--definition", choices=tuple(DEFINITIONS), default="drop")
    table.add_argument("--pick", default=None,
                       help="a comparison with --grid: pick each strategy's best setting (acc, forgetting, "
                       "forgetting:plasticity>=P); default acc")
    table.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                       help=f"allowed drop for pass/fail (default {DEFAULT_THRESHOLD:g})")
    table.add_argument("--costs", action="store_true",
                       help="the cost block instead: training time vs naive, the strategy's state, extra passes per "
                       "step, peak memory")
    sub.add_parser("plot", allow_abbrev=False, help="PNG plots of a run or comparison folder").add_argument(
        "folder", type=Path)
    sub.add_parser("report", allow_abbrev=False, help="write report.html: one self-contained page for a run or "
                   "comparison folder").add_argument("folder", type=Path)
    evaluate = sub.add_parser("eval", allow_abbrev=False, help="evaluate a checkpoint: mAP, mIoU, Top-1")
    evaluate.add_argument("--weights", type=Path, required=True, help="a checkpoints/stage{k}.pt of a run")
    evaluate.add_argument("--data-root", type=Path, default=None, help="default: the synthetic benchmark")
    evaluate.add_argument("--tasks", default="all", help="all, or some of the checkpoint's task names")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _data_parsers(data: argparse._SubParsersAction) -> None:
    synth = data.add_parser("synth", allow_abbrev=False, help="write the synthetic benchmark in the real formats")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=_count(0), default=0)
    synth.add_argument("--n-train", type=_count(1), default=FIELDS["synth_train"].default)
    synth.add_argument("--n-val", type=_count(1), default=FIELDS["synth_val"].default)
    synth.add_argument("--domain", choices=("distinct", "shared"), default="distinct",
                       help="distinct: each task its own image statistics; shared: one scene generator for all tasks")
    synth.add_argument("--variant", choices=("default", "voc21"), default="default",
                       help="segmentation's classes: default = background + 5; voc21 = VOC's 21 (class-incremental "
                       "benchmarks)")
    prep = data.add_parser("prepare", allow_abbrev=False,
                           help="the mini subsets from the official downloads (folders or archives)")
    prep.add_argument("--coco", type=Path, required=True, help="folder with val2017/ + annotations/, or the zips")
    prep.add_argument("--voc", type=Path, required=True, help="VOCdevkit or VOC2012 folder, or the tar")
    prep.add_argument("--imagenette", type=Path, required=True, help="imagenette2-160 folder, or the tgz")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--counts", default="240,60", help="TRAIN,VAL images per task (default 240,60)")
    prep.add_argument("--classes", default=None, help="COCO classes by name or id (default ids 1-10)")
    prep.add_argument("--seed", type=int, default=0)
    down = data.add_parser("download", allow_abbrev=False, help="fetch the official archives (resumable, checked)")
    down.add_argument("--out", type=Path, required=True)
    down.add_argument("--only", default="coco,voc,imagenette", help="some of coco,coco-train,voc,imagenette")
    down.add_argument("--mirror", default=None, help="base URL serving the same file names")
    _import_parser(data)
    data.add_parser("verify", allow_abbrev=False, help="check a data root and count images per class").add_argument(
        "root", type=Path)


def _import_parser(data: argparse._SubParsersAction) -> None:
    imp = data.add_parser("import", allow_abbrev=False,
                          help="a mini set in a user's layout (FiftyOne, COCO JSON + folder, VOC lists, ImageFolder, "
                          "...) → clbench's layout with a manifest; the source is only read")
    imp.add_argument("src", type=Path, help="the folder holding the three task folders (found by their content)")
    imp.add_argument("--out", type=Path, required=True, help="a new or empty folder: the data root to run on")
    imp.add_argument("--classes", default=None,
                     help="detection classes by name (or id), comma-separated; default: COCO ids 1-10 when present "
                     "in both splits, else the 10 most frequent (by images) present in both")
    imp.add_argument("--drop-leaked", action="store_true",
                     help="remove from train every image whose bytes are also in val (refused otherwise)")
    for flag, what in (("--coco", "detection"), ("--voc", "segmentation"), ("--cls", "classification")):
        imp.add_argument(flag, type=Path, default=None, help=f"the {what} folder, when finding it by content is "
                         "ambiguous")


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser("compare", allow_abbrev=False,
                             help="strategy x seed grid on one benchmark; prints the summary drop table")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help=f"comma-separated; `all` = every built-in method, naive first (`clbench strategies` lists them; "
                         f"bounds are --bounds) (default {DEFAULT_STRATEGIES})")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    compare.add_argument("--reference", choices=("none", "single-task"), default="none",
                         help="also train each task alone (same budget, seed) for the drop vs single-task")
    compare.add_argument("--definition", choices=tuple(DEFINITIONS), default=None,
                         help="summary column: drop (default), abs, forgetting, reference")
    compare.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                         help=f"allowed drop for pass/fail (default {DEFAULT_THRESHOLD:g})")
    compare.add_argument("--threshold-mode", choices=("relative", "absolute"), default="relative",
                         help="relative: on drop %%; absolute: on the change in percentage points")
    compare.add_argument("--bounds", default="joint",
                         help="reference rows trained beside the strategies: some of joint,frozen, or none (default "
                         "joint: every task trained at once, same budget; frozen: only each task's head slice trains "
                         "after stage 1)")
    compare.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                         help="one cell per value (repeatable; several keys: their cross product). KEY: a strategy's "
                         "STRATEGY.PARAM (rows labelled lwf[lam=0.1]) or a run setting SETTING or SETTING.TASK, e.g. "
                         "lr, epochs.det, warmup, image_size, schedule (every strategy's cells; rows labelled "
                         "naive[lr=0.001]; the joint bound and the references keep the base settings)")
    compare.add_argument("--pick", default=None,
                         help="with --grid: pick each strategy's best setting by acc (highest ACC), forgetting "
                         "(lowest F) or forgetting:plasticity>=P (lowest F among settings with plasticity >= P %%); "
                         "default acc")
    _ray_options(compare)
    compare.add_argument("--name", default=None, help="comparison folder name (default: compare-<settings hash>)")
    compare.add_argument("--config", type=Path, default=None, help=(
        "YAML run options shared by every cell, or the name of a shipped one (e.g. real-mini)"))
    add_arguments(compare, skip_role="per_cell")


def _ray_options(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--executor", choices=("sequential", "ray"), default="sequential",
                         help="sequential: the cells one after another in this process (default); ray: each cell a "
                         "Ray task (extra clbench[ray]); the results are the same")
    compare.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                         help="an existing Ray cluster (default: start a local instance, loopback only)")
    compare.add_argument("--cell-cpus", type=_argument(at_least(whole_number, 1)), default=1,
                         help="CPUs (and torch threads) per cell on Ray (default 1)")
    compare.add_argument("--cell-gpus", type=_argument(at_least(finite_float, 0)), default=0.0,
                         help="GPUs per cell on Ray, a fraction packs several cells on one GPU (default 0)")
    compare.add_argument("--retries", type=_argument(at_least(whole_number, 0)), default=2,
                         help="Ray reruns of a cell whose worker or node was lost (default 2; an error in the cell "
                         "itself is not retried)")


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A RunConfig value parser as an argparse type (its message, not argparse's generic one)."""
    def checked(value: str) -> Any:
        try:
            return parse(value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None
    return checked


_threshold = _argument(at_least(finite_float, 0))


def _grid(text: str) -> tuple[str, tuple[str, ...]]:
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ClbenchError(f"--grid {text}: expected STRATEGY.PARAM=V1,V2,... (e.g. lwf.lam=0.1,1,10) or a run "
                           "setting SETTING[.TASK]=V1,V2,... (e.g. lr=1e-3,3e-4 or epochs.det=10,20)")
    return key.strip(), tuple(v.strip() for v in values.split(","))


def _count(low: int) -> Callable[[str], int]:
    return _argument(at_least(whole_number, low))


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but an unknown flag names the closest known one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser._subparsers._group_actions[0].choices.get(args.command)  # noqa: SLF001 — argparse has no API
        known = [opt for action in sub._actions for opt in action.option_strings]  # noqa: SLF001
        parser.error(f"unknown argument {unknown[0]!r}" + did_you_mean(unknown[0].split("=")[0], known))
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    commands = {"run": _run, "compare": _compare, "table": _table, "plot": _plot, "eval": _eval,
                "strategies": _strategies, "configs": _configs, "benchmarks": _benchmarks, "data": _data, "report": _report}
    try:
        return commands[args.command](args)
    except ClbenchError as exc:
        for line in str(exc).splitlines() or [""]:  # a check that lists several problems: one line each
            print(f"clbench: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`clbench table DIR | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("clbench: interrupted; finished stages and cells are kept (rerun the command to resume a comparison)",
              file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from clbench.reader import RunData
    from clbench.report import class_group_text, curve_text, own_stage_line, run_summary
    from clbench.run import run as run_one
    if args.resume is not None:
        config = _resumed_config(args)
    else:
        config = resolve(args.config, run_fields(vars(args)))
    run_dir = run_one(config, resume=args.resume is not None)
    data = RunData.load(run_dir)
    print(run_summary(data.rows, data.tasks, data.chance, data.resources))
    print(own_stage_line(data.rows, data.validation, data.tasks))
    for extra in (curve_text(data.rows, data.curve, data.tasks), class_group_text(data.by_class, data.class_tasks)):
        if extra:
            print("\n" + extra)
    print(f"\nresults: {run_dir}")
    return 0


def _resumed_config(args: argparse.Namespace) -> RunConfig:
    """The configuration an interrupted run saved; only --progress may be given beside --resume."""
    import dataclasses
    given = sorted(set(run_fields(vars(args))) - {"progress"}) + (["config"] if args.config else [])
    if given:
        raise ClbenchError(f"--resume {args.resume}: takes the run's own config.yaml; --{given[0].replace('_', '-')} "
                           "cannot be given with it")
    if not (args.resume / "config.yaml").is_file():
        raise ClbenchError(f"--resume {args.resume}: not a run folder (no config.yaml)")
    config = resolve(args.resume / "config.yaml", {})
    return dataclasses.replace(config, out=str(args.resume.parent), run_id=args.resume.name,
                               progress=getattr(args, "progress", config.progress))


def _compare(args: argparse.Namespace) -> int:
    """Run the grid (the writers), then write and print its views from one read of the folder."""
    from clbench.compare import compare
    from clbench.page import write_report
    from clbench.reader import ComparisonData
    from clbench.summary import eval_share_line, write_summary
    settings, definition = _compare_settings(args)
    folder = compare(settings, out=Path(settings.base.out), name=args.name, progress=settings.base.progress,
                     executor=_executor(args))
    data = ComparisonData.load(folder)
    print(write_summary(data, definition, args.threshold, pick=args.pick))
    write_report(data)
    report = json.loads((folder / "cache_report.json").read_text())
    if report["stage1_reused_by_cells_this_invocation"]:
        print(f"stage 1 came from the cache in {report['stage1_reused_by_cells_this_invocation']} cells: "
              f"{report['stage1_seconds_saved_this_invocation']:.0f} s of training saved")
    print(eval_share_line(data))
    print(f"results: {folder}")
    for line in data.failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if data.failed else 0


def _compare_settings(args: argparse.Namespace) -> tuple[Any, str]:
    """The grid and the summary's definition from the flags, every value checked before anything trains."""
    from clbench.compare import CompareSettings
    from clbench.plugins import builtins
    from clbench.summary import parse_pick
    base = resolve(args.config, run_fields(vars(args)))
    definition = _definition(args.definition, args.threshold_mode, args.reference == "single-task")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ClbenchError(f"--seeds {args.seeds}: expected distinct comma-separated whole numbers >= 0")
    if args.name is not None and not RUN_ID.fullmatch(args.name):
        raise ClbenchError(f"--name {args.name}: expected a plain folder name, not a path")
    strategies = tuple(name for s in args.strategies.split(",") if s.strip()
                       for name in (builtins() if s.strip() == "all" else [s.strip()]))
    if args.pick is not None:
        parse_pick(args.pick)
    bounds = () if args.bounds.strip() == "none" else tuple(b.strip() for b in args.bounds.split(",") if b.strip())
    settings = CompareSettings(strategies=strategies, seeds=seeds, reference=args.reference == "single-task", base=base,
                               bounds=bounds, grid=tuple(_grid(g) for g in args.grid))
    if definition == "plasticity" and not settings.reference and "joint" not in settings.bounds:
        raise ClbenchError("--definition plasticity needs --reference single-task or the joint bound (--bounds joint)")
    return settings, definition


def _executor(args: argparse.Namespace) -> Any:
    """RayOptions for --executor ray; None (sequential) otherwise, where a Ray flag is an error."""
    from clbench.executors import RayOptions
    ray_flags = [f for f, given in (("--ray-address", args.ray_address is not None), ("--cell-cpus", args.cell_cpus != 1),
                                    ("--cell-gpus", args.cell_gpus != 0), ("--retries", args.retries != 2)) if given]
    if args.executor != "ray" and ray_flags:
        raise ClbenchError(f"{ray_flags[0]}: applies to --executor ray only")
    return RayOptions(args.ray_address, args.cell_cpus, args.cell_gpus, args.retries) if args.executor == "ray" else None


def _definition(definition: str | None, mode: str, has_reference: bool) -> str:
    if definition is None:
        return "abs" if mode == "absolute" else "drop"
    if DEFINITIONS[definition].needs_reference and not has_reference and definition != "plasticity":
        raise ClbenchError(f"--definition {definition} needs --reference single-task")
    if mode == "absolute" and DEFINITIONS[definition].unit == "%":
        raise ClbenchError(f"--threshold-mode absolute applies to --definition abs or forgetting, not {definition}")
    return definition


def _table(args: argparse.Namespace) -> int:
    from clbench.reader import ComparisonData, load
    from clbench.report import class_group_text, curve_text, render, run_table
    data = load(args.folder)
    if args.costs:
        from clbench.summary import cost_text
        print(cost_text(data) or f"{args.folder}: no resources.json (no finished run)")
        return 0
    if isinstance(data, ComparisonData):
        from clbench.summary import comparison_summary, parse_pick
        if args.pick is not None:
            parse_pick(args.pick)
        table, note = comparison_summary(data, args.definition, args.threshold, args.pick)
    else:
        if DEFINITIONS[args.definition].needs_reference:
            raise ClbenchError(f"--definition {args.definition} needs a comparison folder (clbench compare --reference "
                               "single-task)")
        table, note = run_table(data.rows, data.tasks, args.definition, args.threshold, data.chance)
    print(render(table, args.format).rstrip("\n"))
    if args.format == "md":
        print("\n" + note)
        curve = curve_text(data.rows, data.curve, data.tasks, getattr(data, "references", None),
                           getattr(data, "order", ()))
        groups = class_group_text(data.by_class, data.class_tasks, getattr(data, "order", ()))
        for extra in (curve, groups):
            if extra:
                print("\n" + extra)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from clbench.plots import SKIPPED, plot_folder
    from clbench.reader import ComparisonData, load
    data = load(args.folder)
    paths = plot_folder(data)
    for path in paths:
        print(path)
    if isinstance(data, ComparisonData) and not any(p.name == "stability_plasticity.png" for p in paths):
        print(SKIPPED)
    return 0


def _report(args: argparse.Namespace) -> int:
    from clbench.page import write_report
    from clbench.reader import load
    print(write_report(load(args.folder)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from clbench.checkpoint import evaluate_checkpoint
    for task, metrics in evaluate_checkpoint(args.weights, args.data_root, args.tasks, args.device).items():
        print(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return 0


def _configs(args: argparse.Namespace) -> int:
    """Each shipped configuration: its name, its file, and the comment lines that open it."""
    from clbench.config import shipped_configs
    for name, path in shipped_configs().items():
        about = [line.lstrip("# ").rstrip() for line in path.read_text().splitlines() if line.startswith("#")]
        print(f"{name}  [{path}]")
        for line in about[:3]:
            print(f"    {line}")
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    """Each shipped benchmark file: its name, file, description and experiences (task and classes)."""
    from clbench.protocol import load_protocol, shipped_protocols
    for name, path in shipped_protocols().items():
        protocol = load_protocol(name)
        steps = " -> ".join(e.task + (f"[{','.join(map(str, e.classes))}]" if e.classes is not None else "")
                            for e in protocol.experiences)
        synthetic = "" if protocol.synthetic == "default" else f"; synthetic data: {protocol.synthetic}"
        print(f"{name}  [{path}]\n    {protocol.description}\n    {steps}{synthetic}")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from clbench.plugins import Broken, available
    from clbench.strategy import hyperparameters
    for name, found in sorted(available().items()):
        if isinstance(found, Broken):
            print(f"{name}  [{found.origin}]  BROKEN\n    {found.error}")
            continue
        scope = {"classes": "earlier tasks and a class-incremental task's earlier classes",
                 "tasks": "earlier tasks only (refused on a benchmark file with class steps)",
                 "none": "nothing (the lower bound)"}.get(found.cls.protects, found.cls.protects)
        print(f"{name}  [{found.origin}]\n    {found.cls.description}\n    protects: {scope}")
        for hp in hyperparameters(found.cls).values():
            default = ",".join(map(str, hp.default)) if isinstance(hp.default, tuple) else hp.default
            print(f"    --set {name}.{hp.name}={default}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from clbench.benchmarks.synthetic import SynthSpec, generate
        out = generate(args.out, SynthSpec(seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                                           domain=args.domain, variant=args.variant))
        print(f"synthetic benchmark written to {out}")
    elif args.data_command == "prepare":
        from clbench.benchmarks.prepare import Counts, prepare
        from clbench.benchmarks.verify import format_report, verify
        try:
            train, val = (int(v) for v in args.counts.split(","))
        except ValueError:
            raise ClbenchError(f"--counts {args.counts}: expected TRAIN,VAL, e.g. 240,60") from None
        out = prepare(coco=args.coco, voc=args.voc, imagenette=args.imagenette, out=args.out,
                      counts=Counts(train, val), seed=args.seed, coco_classes=args.classes)
        print(format_report(verify(out)))
        print(f"written to {out} (manifest.json lists every file with its sha256)")
    elif args.data_command == "import":
        from clbench.benchmarks.importer import ImportOptions, import_data
        from clbench.benchmarks.verify import format_report, verify
        import_data(args.src, args.out, ImportOptions(args.classes, args.drop_leaked,
                                                      {"det": args.coco, "seg": args.voc, "cls": args.cls}))
        print(format_report(verify(args.out)))
    elif args.data_command == "download":
        from clbench.benchmarks.download import download_all
        for path in download_all(args.out, [w.strip() for w in args.only.split(",")], mirror=args.mirror):
            print(path)
    else:
        from clbench.benchmarks.verify import format_report, verify
        print(format_report(verify(args.root)))
    return 0
