"""`clbench plot`: PNGs made from the CSVs alone — metric across stages, drop bars, BN drift per layer."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from clbench import ClbenchError
from clbench.drop import DEFINITIONS, near_chance
from clbench.figures import pyplot, save
from clbench.reader import ComparisonData, Folder
from clbench.report import JOINT_LABEL, SUMMARY, cost_frame, joint_measures, primary_metrics, run_measures, time_vs_naive
from clbench.tasks import TaskSpec


def plot_folder(data: Folder) -> list[Path]:
    """Every plot the folder's results allow, into ``plots/``; a comparison's stability-plasticity plot needs
    single-task references or the joint bound (``SKIPPED`` says so when it has neither)."""
    metrics = data.rows
    out = data.path / "plots"
    out.mkdir(exist_ok=True)
    paths = [plot_stages(metrics, data.tasks, out / "metric_by_stage.png"),
             plot_drops(metrics, data.tasks, out / "drop_percent.png", chance=data.chance)]
    if not data.bn_drift.empty:
        paths.append(plot_bn_drift(data.bn_drift, out / "bn_drift.png"))
    if not data.curve.empty:
        paths.append(plot_curves(data.curve, data.tasks, out / "curve.png"))
    if isinstance(data, ComparisonData):
        try:
            references, _ = data.measured_against("plasticity")
        except ClbenchError:
            (out / "stability_plasticity.png").unlink(missing_ok=True)
        else:
            paths.append(plot_stability_plasticity(metrics, data.tasks, references, data.joint,
                                                   out / "stability_plasticity.png",
                                                   joint_is_reference=references == data.joint_finals(),
                                                   cost=strategy_time_vs_naive(data)))
    return paths


SKIPPED = "stability_plasticity.png: not drawn (needs --reference single-task or the joint bound, --bounds joint)"


def stability_points(rows: pd.DataFrame, tasks: list[TaskSpec], references: dict[int, dict[str, float]]
                     ) -> pd.DataFrame:
    """Per strategy: plasticity (mean over tasks, %) and forgetting F (mean over tasks, pp), each a mean and a
    sample std over seeds, and whether it lies on the Pareto front (no other strategy has at least its
    plasticity and at most its forgetting, one of them strictly)."""
    per_seed = []
    for name in ("plasticity", "forgetting"):
        m = run_measures(rows, tasks, name, references if name == "plasticity" else None)
        per_seed.append(m[m.task == SUMMARY].set_index(["strategy", "seed"])["value"].rename(name))
    both = pd.concat(per_seed, axis=1).reset_index()
    points = both.groupby("strategy", sort=False).agg(
        plasticity=("plasticity", "mean"), plasticity_std=("plasticity", "std"),
        forgetting=("forgetting", "mean"), forgetting_std=("forgetting", "std"), seeds=("seed", "nunique"))
    points = points.reindex(list(dict.fromkeys(rows["strategy"]))).dropna(subset=["plasticity", "forgetting"])
    points["pareto"] = pareto_front(list(zip(points["plasticity"], points["forgetting"])))
    return points


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (plasticity, forgetting): True when no other point has at least its plasticity and at most its
    forgetting with one of them strictly better (higher plasticity and lower forgetting are better)."""
    return [not any(p2 >= p and f2 <= f and (p2, f2) != (p, f) for p2, f2 in points) for p, f in points]


MARKERS = ("o", "s", "^", "D", "v")


def plot_stability_plasticity(rows: pd.DataFrame, tasks: list[TaskSpec], references: dict[int, dict[str, float]],
                              joint: pd.DataFrame | None, path: Path, *, joint_is_reference: bool = False,
                              cost: dict[str, float] | None = None) -> Path:
    """x = plasticity, y = forgetting F, one point per strategy (and grid setting), labelled, error bars = std
    over seeds; the Pareto front joined and ringed; the joint bound drawn as a reference line.
    ``joint_is_reference``: plasticity is measured against the joint bound (no single-task references).
    ``cost``: strategy -> training time against naive's; each point's area grows with it."""
    plt = pyplot()
    points = stability_points(rows, tasks, references)
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    for i, (name, p) in enumerate(points.iterrows()):  # ten colours, then the next marker: every point distinct
        size = 6 * math.sqrt(cost[name]) if cost and not math.isnan(cost.get(name, math.nan)) else 6
        ax.errorbar(p["plasticity"], p["forgetting"], xerr=p["plasticity_std"] if p["seeds"] > 1 else None,
                    yerr=p["forgetting_std"] if p["seeds"] > 1 else None, fmt=MARKERS[(i // 10) % len(MARKERS)],
                    color=f"C{i % 10}", capsize=3, markersize=size, alpha=0.9,
                    label=f"{name} ({cost[name]:.2f}x naive's time)" if cost and name in cost else name)
        ax.annotate(name, (p["plasticity"], p["forgetting"]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    front = points[points["pareto"]].sort_values("plasticity")
    ax.plot(front["plasticity"], front["forgetting"], color="black", linewidth=1, linestyle="--", zorder=0,
            label="Pareto front")
    ax.scatter(front["plasticity"], front["forgetting"], s=160, facecolors="none", edgecolors="black", zorder=3)
    if joint is not None and not joint.empty:
        m = joint_measures(joint, tasks, "plasticity", references)
        x = m[m.task == SUMMARY]["value"].mean()
        ax.axvline(x, color="grey", linestyle=":", label=f"{JOINT_LABEL}: plasticity {x:.0f}%, no forgetting")
    ax.axhline(0, color="black", linewidth=0.6)
    reference = "joint" if joint_is_reference and references else "single-task"
    ax.set_xlabel(f"plasticity (%): own-stage metric / {reference}, mean over tasks")
    ax.set_ylabel("forgetting F (pp), lower = better")
    ax.set_title("Stability vs plasticity, mean ± std over seeds (better: right, down)"
                 + ("\nmarker area ∝ training time against naive's" if cost else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, path)


def strategy_time_vs_naive(data: ComparisonData) -> dict[str, float]:
    """Per strategy: its training time against naive's of the same seed, mean over seeds ({} without naive)."""
    costs = cost_frame(data.runs)
    if costs.empty:
        return {}
    return costs.assign(ratio=time_vs_naive(costs)).groupby("strategy")["ratio"].mean().dropna().to_dict()


def plot_curves(curve: pd.DataFrame, tasks: list[TaskSpec], path: Path) -> Path:
    """Each task's metric over the run's optimizer steps (the probe, --eval-every), one line per strategy (mean over
    seeds, band = std), the stage boundaries marked."""
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 1, figsize=(9, 2.4 * len(tasks)), squeeze=False, sharex=True)
    ends = curve.groupby("stage")["global_step"].max().sort_index()
    for ax, task in zip(axes[:, 0], tasks):
        points = curve[curve.eval_task == task.name]
        for i, (strategy, group) in enumerate(points.groupby("strategy", sort=False)):
            stats = group.groupby("global_step")["value"].agg(["mean", "std"]).fillna(0.0)
            ax.plot(stats.index, stats["mean"], color=f"C{i % 10}", label=strategy, linewidth=1.2)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                            color=f"C{i % 10}", alpha=0.2, linewidth=0)
        for stage, end in ends.items():
            if stage > 0:
                ax.axvline(end, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylabel(f"{task.label}\n{task.metric_label}", fontsize=8)
        ax.grid(alpha=0.3)
    for stage, end in ends.items():
        if stage > 0:
            axes[0, 0].annotate(f"end of stage {stage}", (end, 1), xycoords=("data", "axes fraction"), fontsize=7,
                                ha="right", va="bottom")
    axes[-1, 0].set_xlabel("optimizer step over the run (stage boundaries dotted)")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Every task inside the stages: probe of {int(curve.probe.iloc[0])} test images, mean ± std over seeds",
                 fontsize=10)
    return save(fig, path)


def plot_stages(metrics: pd.DataFrame, tasks: list[TaskSpec], path: Path) -> Path:
    """Each task's primary metric after every stage, one line per strategy (mean over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    rows = metrics[metrics["metric"] == metrics["eval_task"].map(primary_metrics(tasks))]
    for ax, task in zip(axes[0], tasks):
        for strategy, group in rows[rows.eval_task == task.name].groupby("strategy", sort=False):
            mean = group.groupby("stage")["value"].mean()
            ax.plot(mean.index, mean.values, marker="o", label=strategy)
        ax.set_title(f"{task.label}: {task.metric_label}")
        ax.set_xlabel("after stage (0 = before training)")
        ax.set_xticks(sorted(rows["stage"].unique()))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("metric")
    axes[0][-1].legend(fontsize=8)
    return save(fig, path)


def plot_drops(metrics: pd.DataFrame, tasks: list[TaskSpec], path: Path, definition: str = "drop",
               chance: dict[str, float] | None = None) -> Path:
    """A definition's value (drop % by default) per task and strategy, mean with sample-std error bars over
    seeds; tasks where it is undefined (the task trained last) have no bars; hatched bars: a seed's base
    R[s(t),t] was near chance (``near_chance``: its interval reaches it); dotted edges: a seed's change was within
    noise (``change_within_noise``)."""
    plt = pyplot()
    d = DEFINITIONS[definition]
    measures = run_measures(metrics, tasks, definition).dropna(subset=["value"])
    stats = measures.groupby(["task", "strategy"], sort=False)["value"].agg(["mean", "std"]).reset_index()
    tasks = [t for t in tasks if t.name in set(stats["task"])]
    strategies = list(dict.fromkeys(metrics["strategy"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 + 1.3 * len(strategies) * max(len(tasks), 1) / 2), 3.6))
    width = 0.8 / max(len(strategies), 1)
    for i, strategy in enumerate(strategies):
        part = stats[stats.strategy == strategy].set_index("task").reindex([t.name for t in tasks])
        xs = [k + i * width for k in range(len(tasks))]
        bars = ax.bar(xs, part["mean"], width, yerr=part["std"].fillna(0), capsize=3, label=strategy)
        for bar, task in zip(bars, [t.name for t in tasks]):
            cell = measures[(measures.strategy == strategy) & (measures.task == task)]
            if any(near_chance(b, (chance or {}).get(task), low) for b, low in zip(cell["base"], cell["base_ci_low"])):
                bar.set_hatch("//")
            if any(bool(n) for n in cell["noise"] if n is not None):
                bar.set_linestyle(":")
                bar.set_edgecolor("black")
    ax.set_xticks([k + width * (len(strategies) - 1) / 2 for k in range(len(tasks))])
    ax.set_xticklabels([t.label for t in tasks])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"{d.column} ({'higher' if d.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{d.column}, mean ± std over seeds")
    if any(bar.get_hatch() for bar in ax.patches):
        ax.bar([0], [0], 0, color="white", edgecolor="black", hatch="//", label="base near chance")
    if any(bar.get_linestyle() == ":" for bar in ax.patches):
        ax.bar([0], [0], 0, color="white", edgecolor="black", linestyle=":", label="change within noise")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars reach the top edge
    return save(fig, path)


def plot_bn_drift(drift: pd.DataFrame, path: Path) -> Path:
    """Relative drift of every BN layer's running mean/var at the last stage since the end of stage 1."""
    plt = pyplot()
    last = drift[(drift.stage == drift.stage.max()) & (drift.reference_stage == 1)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
    for ax, stat in zip(axes, ("running_mean", "running_var")):
        for strategy, group in last[last.statistic == stat].groupby("strategy", sort=False):
            mean = group.groupby("layer", sort=False)["distance"].mean()
            ax.plot(range(len(mean)), mean.values, label=strategy, linewidth=1.2)
        ax.set_title(f"{stat}: ‖s − s(stage 1)‖ / ‖s(stage 1)‖ after the last stage")
        ax.set_xlabel("BN layer (input → output)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative drift")
    axes[1].legend(fontsize=8)
    return save(fig, path)
