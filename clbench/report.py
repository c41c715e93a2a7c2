"""Tables from tidy metrics rows and the run's task list alone: one run's stage table, a comparison's
strategies × tasks summary. Every column's meaning comes from ``clbench.drop.DEFINITIONS``."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from clbench.drop import (
    DEFAULT_THRESHOLD,
    DEFINITIONS,
    GAP_TOLERANCE,
    Definition,
    change_within_noise,
    metric_matrix,
    min_acc,
    near_chance,
    own_stage_values,
    stability_gaps,
    trained_at,
    wc_acc,
)
from clbench.incremental import group_name
from clbench.recorder import Resources
from clbench.tasks import TaskSpec


def primary_metrics(tasks: Sequence[TaskSpec]) -> dict[str, str]:
    return {t.name: t.metric for t in tasks}


SUMMARY = "__summary__"  # the key of a definition's mean over tasks (ACC, BWT, ...) among the per-task values


def measure(rows: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str,
            reference: dict[str, float] | None = None) -> dict[str, float]:
    """One run's per-task value under ``definition``, in its unit; NaN where undefined; plus the mean over
    tasks under ``SUMMARY`` for a definition that has one."""
    R, trained, d = metric_matrix(rows, primary_metrics(tasks)), trained_at(rows), DEFINITIONS[definition]
    values = d.values(R, trained, reference)
    return {**values, SUMMARY: d.summarised(values)} if d.summary else values


def stage_table(rows: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str = "drop",
                reference: dict[str, float] | None = None, threshold: float | None = None,
                chance: dict[str, float] | None = None) -> pd.DataFrame:
    """The original report's layout: Task | Metric | Stage 1..S | Strategy | <definition column> [| pass/fail]."""
    R, trained = metric_matrix(rows, primary_metrics(tasks)), trained_at(rows)
    d = DEFINITIONS[definition]
    values, last = measure(rows, tasks, definition, reference), max(trained.values())
    table = []
    for task in sorted((t for t in tasks if t.name in trained), key=lambda t: trained[t.name]):
        s_t = trained[task.name]
        row = {"Task": task.label, "Metric": task.metric_label}
        for s in range(1, last + 1):
            row[f"Stage {s}"] = f"{R.at[s, task.name]:.3f}" if s >= s_t and s in R.index else "-"
        row["Strategy"] = str(rows["strategy"].iloc[0])
        row[d.column] = cell_text(values[task.name], d, trained_last=s_t == last)
        if d.from_own_stage and s_t < last:
            evidence = own_stage_evidence(rows, tasks, task.name, trained)
            if near_chance(_value(R, s_t, task.name), (chance or {}).get(task.name), evidence["base_ci_low"]):
                row[d.column] += f" ({NEAR_CHANCE})"
            if evidence["noise"]:
                row[d.column] += f" ({WITHIN_NOISE})"
        if threshold is not None and d.thresholded:
            verdict = d.passes(values[task.name], threshold)
            row[f"Within {threshold:g}"] = "-" if verdict is None else ("pass" if verdict else "FAIL")
        split = bn_attribution(rows, task, s_t, last)
        if split is not None:
            row[BN_COLUMN] = ("-" if s_t == last else "n/a (cell missing)" if math.isnan(split[0] + split[1])
                              else f"{split[0]:+.2f} / {split[1]:+.2f}")
        table.append(row)
    return pd.DataFrame(table)


def threshold_note(d: Definition, threshold: float) -> str:
    unit = "%" if d.unit == "%" else " pp"
    worse = "lost at most" if d.higher_is_better else "forgot at most"
    return f"Within {threshold:g}: pass when the task {worse} {threshold:g}{unit} (the definition's unit)."


def run_table(rows: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str = "drop",
              threshold: float | None = None, chance: dict[str, float] | None = None) -> tuple[pd.DataFrame, str]:
    """One run's stage table and its footnote (the definition, the threshold, the BN split when present)."""
    table = stage_table(rows, tasks, definition, threshold=threshold, chance=chance)
    d = DEFINITIONS[definition]
    note = d.text + ("\n" + threshold_note(d, threshold) if threshold is not None and d.thresholded else "")
    if d.summary:
        note += f"\n{d.summary} = {d.format(measure(rows, tasks, definition)[SUMMARY])}."
    if d.normalises:
        note += "\n" + NO_REFERENCE
    shown = " ".join(table.astype(str).values.ravel())
    if NEAR_CHANCE in shown:
        note += "\n" + chance_note(chance or {})
    if WITHIN_NOISE in shown:
        note += "\n" + NOISE_NOTE
    return table, note + ("\n" + BN_NOTE if BN_COLUMN in table else "")


NEAR_CHANCE = "base near chance"
WITHIN_NOISE = "within noise"
NOISE_NOTE = (f"{WITHIN_NOISE}: the paired 95% bootstrap interval of R[S,t] - R[s(t),t] includes 0 (the test images "
              "resampled with replacement, the same resamples at both stages; bootstrap.csv), so the change is not "
              "told apart from the test set's sampling noise.")


def chance_note(chance: dict[str, float]) -> str:
    levels = ", ".join(f"{task} {value:.3f}" for task, value in chance.items())
    return (f"{NEAR_CHANCE}: the 95% bootstrap interval of the task's metric after its own stage reaches its chance "
            f"level on the test set (without an interval: the metric is at most 2x chance; chance levels {levels}: "
            "top-1 of the most frequent class, mIoU of predicting the most frequent class everywhere, mAP of the "
            "untrained network at stage 0), so a drop from it says little.")


def _value(R: pd.DataFrame, stage: int, task: str) -> float:
    return float(R.at[stage, task]) if stage in R.index and task in R.columns else math.nan


NO_REFERENCE = "N = R: no single-task reference (a comparison with --reference single-task normalises)."
BN_COLUMN = "BN drift / weights (pp)"
BN_NOTE = ("BN drift / weights: the change R[S,t] - R[s(t),t] (x100) split into 100 x (R[S,t] - R_ownBN) and "
           "100 x (R_ownBN - R[s(t),t]), where R_ownBN re-evaluates t with the final weights but the BatchNorm "
           "statistics saved at the end of its own stage.")


def bn_attribution(rows: pd.DataFrame, task: TaskSpec, own_stage: int, last: int) -> tuple[float, float] | None:
    """(part of R[S,t] - R[s(t),t] due to BN statistics, part due to weights), x 100; None when the run has no
    BN audit rows, NaNs when a cell is missing."""
    if not rows["metric"].astype(str).str.endswith("_own_bn").any():
        return None

    def value(stage: int, name: str) -> float:
        cell = rows[(rows["stage"] == stage) & (rows["eval_task"] == task.name) & (rows["metric"] == name)]["value"]
        return float(cell.iloc[0]) if len(cell) else math.nan

    own_bn, final, base = value(last, f"{task.metric}_own_bn"), value(last, task.metric), value(own_stage, task.metric)
    return 100 * (final - own_bn), 100 * (own_bn - base)


def cell_text(value: float, d: Definition, *, trained_last: bool) -> str:
    if math.isnan(value):
        if trained_last and d.trained_last == "undefined":
            return "undefined (trained last)"
        return "undefined (base 0)" if d.unit == "%" else "n/a"
    return d.format(value)


MEASURE_COLUMNS = ["strategy", "seed", "task", "value", "base", "base_ci_low", "noise"]


def run_measures(rows: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str,
                 references: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """Long table (strategy, seed, task, value, base, base_ci_low, noise): ``definition`` for every run in
    ``rows``; base = the task's metric after its own stage, R[s(t),t], with the low end of its bootstrap interval;
    noise = whether the change from it to the last stage is within noise (``change_within_noise``; None without
    resamples)."""
    out = []
    for (strategy, seed, _), run in rows.groupby(["strategy", "seed", "run_id"], sort=True):
        reference = (references or {}).get(int(seed))
        trained = trained_at(run)
        bases = own_stage_values(metric_matrix(run, primary_metrics(tasks)), trained)
        for task, value in measure(run, tasks, definition, reference).items():
            evidence = own_stage_evidence(run, tasks, task, trained)
            out.append({"strategy": strategy, "seed": int(seed), "task": task, "value": value,
                        "base": bases.get(task, math.nan), **evidence})
    return pd.DataFrame(out, columns=MEASURE_COLUMNS)


def own_stage_evidence(run: pd.DataFrame, tasks: Sequence[TaskSpec], task: str,
                       trained: dict[str, int]) -> dict[str, Any]:
    """Of one run's task: the low end of its base's 95% interval (metrics.csv ci_low) and whether its change to
    the last stage is within noise (from the rows' ``resampled`` values, which the reader joins from
    bootstrap.csv)."""
    if task not in trained:
        return {"base_ci_low": math.nan, "noise": None}
    primary = primary_metrics(tasks).get(task)
    rows = run[(run["eval_task"] == task) & (run["metric"] == primary)].set_index("stage")
    s_t, last = trained[task], int(run["stage"].max())
    low = float(rows.at[s_t, "ci_low"]) if "ci_low" in rows and s_t in rows.index else math.nan
    resampled = rows["resampled"] if "resampled" in rows else {}
    noise = change_within_noise(resampled.get(s_t), resampled.get(last)) if s_t < last else None
    return {"base_ci_low": low, "noise": noise}


def aggregate(measures: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std, n and a 95% t-interval (n >= 3) per strategy and task; NaNs are left out."""
    from scipy import stats
    rows = []
    for (strategy, task), group in measures.groupby(["strategy", "task"], sort=False):
        values = group["value"].dropna().to_numpy()
        n = len(values)
        mean = float(values.mean()) if n else math.nan
        std = float(values.std(ddof=1)) if n >= 2 else math.nan
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n >= 3 else math.nan
        rows.append({"strategy": strategy, "task": task, "mean": mean, "std": std, "n": n,
                     "ci_low": mean - half, "ci_high": mean + half})
    return pd.DataFrame(rows, columns=["strategy", "task", "mean", "std", "n", "ci_low", "ci_high"])


def paired_difference(measures: pd.DataFrame, baseline: str = "naive") -> pd.DataFrame:
    """Mean over seeds of (strategy − baseline) on the same seed, per strategy and task."""
    wide = measures.pivot_table(index=["task", "seed"], columns="strategy", values="value", dropna=False)
    if baseline not in wide.columns:
        return pd.DataFrame(columns=["strategy", "task", "mean_diff", "n"])
    rows = []
    for strategy in wide.columns:
        diff = (wide[strategy] - wide[baseline]).dropna()
        for task, values in diff.groupby(level="task"):
            rows.append({"strategy": strategy, "task": task, "mean_diff": float(values.mean()), "n": len(values)})
    return pd.DataFrame(rows, columns=["strategy", "task", "mean_diff", "n"])


JOINT_LABEL = "joint (all tasks at once)"
# What a joint run (no sequence: every task trained at once) has a value for: its final metrics against a reference.
JOINT_DEFINED = ("acc", "reference", "plasticity")


def joint_measures(joint: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str,
                   references: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """The joint bound's long table like ``run_measures`` (strategy = JOINT_LABEL): a definition of JOINT_DEFINED
    on its final metrics (every task counts as trained at stage 1), the final metric itself otherwise."""
    d, out = DEFINITIONS[definition], []
    for (seed, _), run in joint.groupby(["seed", "run_id"], sort=True):
        R = metric_matrix(run, primary_metrics(tasks))
        trained = {t.name: 1 for t in tasks if t.name in R.columns}
        if definition in JOINT_DEFINED:
            values = d.values(R, trained, (references or {}).get(int(seed)))
            values = {**values, SUMMARY: d.summarised(values)} if d.summary else values
        else:
            values = {task: _value(R, int(R.index.max()), task) for task in trained}
        out += [{"strategy": JOINT_LABEL, "seed": int(seed), "task": task, "value": value, "base": math.nan}
                for task, value in values.items()]
    return pd.DataFrame(out, columns=["strategy", "seed", "task", "value", "base"])


def joint_row(joint: pd.DataFrame, tasks: Sequence[TaskSpec], d: Definition, references: dict | None,
              also: Sequence[str]) -> dict[str, object]:
    """The joint bound's row of a comparison table: the definition where it has a meaning for a run without a
    sequence, else the task's final metric ("final 0.734 ± 0.012"); each ``also`` summary likewise."""
    stats = aggregate(joint_measures(joint, tasks, d.name, references)).set_index(["strategy", "task"])
    row: dict[str, object] = {"Strategy": JOINT_LABEL}
    for task in tasks:
        if (JOINT_LABEL, task.name) not in stats.index:
            continue
        s = stats.loc[(JOINT_LABEL, task.name)]
        row[f"{task.label} ({task.metric_label})"] = _stat_cell(s, d) if d.name in JOINT_DEFINED else \
            f"final {s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["n"] >= 2 else "")
    if d.summary:
        row[f"{d.summary} (mean over tasks)"] = _stat_cell(stats.loc[(JOINT_LABEL, SUMMARY)], d) \
            if d.name in JOINT_DEFINED else "-"
    for name in also:
        extra = DEFINITIONS[name]
        if name in JOINT_DEFINED:
            summary = aggregate(joint_measures(joint, tasks, name, references)).set_index(["strategy", "task"])
            row[extra.summary] = _stat_cell(summary.loc[(JOINT_LABEL, SUMMARY)], extra)
        else:
            row[extra.summary] = "-"
    row["seeds"] = joint["seed"].nunique()
    return row


def comparison_table(rows: pd.DataFrame, tasks: Sequence[TaskSpec], definition: str = "drop",
                     references: dict[int, dict[str, float]] | None = None, threshold: float | None = None,
                     strategies: list[str] | None = None, chance: dict[str, float] | None = None,
                     joint: pd.DataFrame | None = None, also: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """Strategies × tasks: mean ± std over seeds [95% CI], Δ vs naive (paired), pass/fail; one column per
    definition of ``also`` (its mean over tasks: ACC, BWT, ...); the joint bound's row when its runs are given;
    and the footnote."""
    d = DEFINITIONS[definition]
    measures = run_measures(rows, tasks, definition, references)
    extras = {name: aggregate(run_measures(rows, tasks, name, references)).set_index(["strategy", "task"])
              for name in also}
    stats = aggregate(measures).set_index(["strategy", "task"])
    diffs = paired_difference(measures).set_index(["strategy", "task"])
    shown = [t for t in tasks if t.name in set(measures["task"])]
    order = [s for s in strategies or [] if s in set(rows["strategy"])] or list(dict.fromkeys(rows["strategy"]))
    table = []
    for strategy in order:
        seeds = rows.loc[rows["strategy"] == strategy, "seed"].nunique()
        row = {"Strategy": strategy}
        for task in shown:
            cell = _task_cell(stats.loc[(strategy, task.name)], d, task is tasks[-1], seeds, threshold,
                              diffs.loc[(strategy, task.name), "mean_diff"]
                              if strategy != "naive" and (strategy, task.name) in diffs.index else None)
            row[f"{task.label} ({task.metric_label})"] = cell + chance_flag(measures, strategy, task.name, d, chance)
        if d.summary:
            row[f"{d.summary} (mean over tasks)"] = _stat_cell(stats.loc[(strategy, SUMMARY)], d)
        for name, extra in extras.items():
            row[DEFINITIONS[name].summary] = _stat_cell(extra.loc[(strategy, SUMMARY)], DEFINITIONS[name])
        table.append({**row, "seeds": seeds})
    has_joint = joint is not None and not joint.empty
    if has_joint:
        table.append(joint_row(joint, tasks, d, references, also))
    frame = pd.DataFrame(table)
    return frame, _table_note(d, also, has_joint, threshold, references, chance, frame)


def _task_cell(s: pd.Series, d: Definition, trained_last: bool, seeds: int, threshold: float | None,
               diff: float | None) -> str:
    """One strategy's cell for one task: the statistic, (n=k) when seeds are missing, Δ naive, pass/FAIL."""
    cell = _stat_cell(s, d, trained_last=trained_last) + (f" (n={int(s['n'])})" if 0 < s["n"] < seeds else "")
    if diff is not None and not math.isnan(s["mean"]):
        cell += f"; Δ naive {diff:+.2f}"
    if threshold is not None and d.thresholded and not math.isnan(s["mean"]):
        cell += " pass" if d.passes(s["mean"], threshold) else " FAIL"
    return cell


def _table_note(d: Definition, also: Sequence[str], has_joint: bool, threshold: float | None,
                references: dict | None, chance: dict[str, float] | None, table: pd.DataFrame) -> str:
    """The footnote of a comparison table: every definition it shows, the joint row, the threshold, chance."""
    note = d.text + " Cells: mean ± sample std over seeds, [95% t-interval] with >= 3 seeds; " \
        "Δ naive = mean of the per-seed differences to naive; (n=k): only k seeds had a defined value."
    for name in also:
        note += f" {DEFINITIONS[name].summary} column: {DEFINITIONS[name].text}"
    if has_joint:
        note += (f" {JOINT_LABEL}: every task trained at once with the same budget (clbench.joint); it has no "
                 "sequence, so " + ("its value is on its final metrics." if d.name in JOINT_DEFINED else
                                    "its cells give each task's final metric instead of this definition."))
    if threshold is not None and d.thresholded:
        note += " " + threshold_note(d, threshold)
    if d.normalises or any(DEFINITIONS[name].normalises for name in also):
        note += " " + ("N = R / R_ref: normalised by each seed's single-task reference." if references
                       else NO_REFERENCE)
    shown = " ".join(table.astype(str).values.ravel())
    if NEAR_CHANCE in shown:
        note += " " + chance_note(chance or {})
    if WITHIN_NOISE in shown:
        note += " " + NOISE_NOTE
    return note


def definitions_table(rows: pd.DataFrame, tasks: Sequence[TaskSpec], strategies: Sequence[str],
                      references: dict[str, dict[int, dict[str, float]]] | None = None) -> pd.DataFrame:
    """One compact table: a row per strategy and task (and the strategy's mean over tasks), a column per
    definition (mean over seeds, in the definition's unit; "—" where undefined). ``references``: definition ->
    the references it is measured against; a definition that needs them and has none is left out."""
    references = references or {}
    shown = [d for d in DEFINITIONS.values() if not d.needs_reference or d.name in references]
    means = {d.name: run_measures(rows, tasks, d.name, references.get(d.name)).groupby(["strategy", "task"])["value"]
             .mean() for d in shown}
    out = []
    for strategy in strategies:
        for key, label in [*((t.name, t.label) for t in tasks), (SUMMARY, "mean over tasks")]:
            row = {"Strategy": strategy, "Task": label}
            for d in shown:
                value = means[d.name].get((strategy, key), math.nan)
                row[d.column] = "—" if math.isnan(value) else d.format(value)
            out.append(row)
    return pd.DataFrame(out)


CURVE_NOTE = ("Inside the stages (--eval-every, on the probe images; values normalised as ACC, x100): min-ACC = mean "
              "over the tasks but the last of the lowest value after their own stage; WC-ACC = (1/k) final value of "
              "the last task + (1 - 1/k) min-ACC (De Lange et al., ICLR 2023); stability gap = a task's largest fall "
              "inside a later stage, from its value when that stage began to its lowest point (pp, > 0 = fell), and "
              f"the step at which it was back within {GAP_TOLERANCE:.0%} of that value.")


def curve_measures(rows: pd.DataFrame, curve: pd.DataFrame, tasks: Sequence[TaskSpec],
                   references: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """Per run (strategy, seed) with a curve: min-ACC, WC-ACC and each earlier task's stability gap."""
    out = []
    for (strategy, seed, run_id), run in rows.groupby(["strategy", "seed", "run_id"], sort=False):
        points = curve[curve.run_id == run_id]
        if points.empty:
            continue
        reference = (references or {}).get(int(seed), {})
        trained, R = trained_at(run), metric_matrix(run, primary_metrics(tasks))
        lowest = [v for v in min_acc(points, trained, reference).values() if not math.isnan(v)]
        out.append({"strategy": strategy, "seed": int(seed), "min_acc": sum(lowest) / len(lowest) if lowest else math.nan,
                    "wc_acc": wc_acc(points, R, trained, reference), "gaps": stability_gaps(points, trained, reference)})
    return pd.DataFrame(out, columns=["strategy", "seed", "min_acc", "wc_acc", "gaps"])


def curve_table(measures: pd.DataFrame, tasks: Sequence[TaskSpec], strategies: Sequence[str] = ()) -> pd.DataFrame:
    """Per strategy (mean over seeds; in ``strategies``' order where given): min-ACC, WC-ACC and, per earlier
    task, its stability gap and recovery."""
    table = []
    order = [s for s in strategies if s in set(measures.strategy)] or list(dict.fromkeys(measures.strategy))
    for strategy in order:
        runs = measures[measures.strategy == strategy]
        row = {"Strategy": strategy, "min-ACC (x100)": f"{runs.min_acc.mean():.2f}",
               "WC-ACC (x100)": f"{runs.wc_acc.mean():.2f}"}
        for task in tasks[:-1]:
            gaps = [g[task.name] for g in runs.gaps if task.name in g]
            row[f"{task.label} stability gap"] = _gap_cell(gaps) if gaps else "—"
        table.append({**row, "seeds": len(runs)})
    return pd.DataFrame(table)


COST_NOTE = ("Cost, mean ± std over seeds: training time against naive's of the same seed (paired; a stage taken from "
             "the stage-1 cache counts at what it took to train); the most the strategy held at any point of a stage "
             "(teacher copies, Fisher and importance tensors, buffers, stored outputs: tensors it refers to, measured, "
             "not declared; sampled at a stage's first forward pass, every 50th and after after_stage); forward and "
             "backward passes of any copy of the network per optimizer step beyond the "
             "task's own one (counted at the module); the cell's own peak memory (RSS, or CUDA max allocated).")


def run_costs(rows: pd.DataFrame, resources: Resources) -> dict[str, float]:
    """One run's cost figures from its resources.json (the stages it trained itself)."""
    stages = list(resources.stages.values())
    trained = [s for s in stages if s.steps]
    steps = sum(s.steps for s in trained)
    memory = resources.memory
    return {"strategy": str(rows["strategy"].iloc[0]), "seed": int(rows["seed"].iloc[0]),
            "train_seconds": sum(s.trained_seconds for s in stages),
            "state_mb": max((s.strategy_bytes for s in stages), default=0) / 2**20,
            "extra_forward": sum(s.forwards for s in trained) / steps - 1 if steps else math.nan,
            "extra_backward": sum(s.backwards for s in trained) / steps - 1 if steps else math.nan,
            "peak_mb": memory.get("cuda_max_allocated_mb", memory.get("process_peak_rss_mb", math.nan))}


def cost_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """``run_costs`` of every run (a ``clbench.reader.RunData``) that wrote resources.json."""
    return pd.DataFrame([run_costs(r.rows, r.resources) for r in runs if r.resources is not None])


def cost_table(costs: pd.DataFrame, strategies: Sequence[str] = ()) -> pd.DataFrame:
    """The cost block: per strategy, mean ± std over seeds of ``run_costs``' figures, time paired against naive."""
    costs = costs.assign(vs_naive=time_vs_naive(costs))
    order = [s for s in strategies if s in set(costs.strategy)] or list(dict.fromkeys(costs.strategy))
    table = []
    for strategy in order:
        runs = costs[costs.strategy == strategy]
        cell = lambda column, fmt: _mean_std(runs[column], fmt)  # noqa: E731
        table.append({"Strategy": strategy, "training time vs naive": cell("vs_naive", "{:.2f}x"),
                      "training (s)": cell("train_seconds", "{:.1f}"), "strategy state (MB)": cell("state_mb", "{:.2f}"),
                      "extra forward / step": cell("extra_forward", "{:.2f}"),
                      "extra backward / step": cell("extra_backward", "{:.2f}"),
                      "peak memory (MB)": cell("peak_mb", "{:.0f}"), "seeds": len(runs)})
    return pd.DataFrame(table)


def time_vs_naive(costs: pd.DataFrame) -> list[float]:
    """Each run's training time against naive's of the same seed (NaN where there is no such naive run)."""
    naive = costs[costs.strategy == "naive"].set_index("seed")["train_seconds"]
    return [row.train_seconds / naive[row.seed] if row.seed in naive.index and naive[row.seed] else math.nan
            for row in costs.itertuples()]


def _mean_std(values: pd.Series, fmt: str) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    text = fmt.format(values.mean())
    return text + (f" ± {fmt.format(values.std()).rstrip('x')}" if len(values) > 1 else "")


def curve_text(rows: pd.DataFrame, curve: pd.DataFrame, tasks: Sequence[TaskSpec],
               references: dict[int, dict[str, float]] | None = None, strategies: Sequence[str] = ()) -> str:
    """The curve table in Markdown and its note; "" when no run has a curve."""
    if curve.empty:
        return ""
    measures = curve_measures(rows, curve, tasks, references)
    return "" if measures.empty else to_markdown(curve_table(measures, tasks, strategies)) + "\n\n" + CURVE_NOTE


def _gap_cell(gaps: list) -> str:
    recovered = sorted(g.recovered_at for g in gaps if g.recovered_at is not None)
    stages = sorted({g.stage for g in gaps})
    cell = f"{sum(g.size for g in gaps) / len(gaps):+.2f} pp (stage {'/'.join(map(str, stages))}), lowest at step " \
        f"{sorted(g.lowest_at for g in gaps)[len(gaps) // 2]}"
    if not recovered:
        return cell + ", never recovered"
    return cell + f", recovered {len(recovered)}/{len(gaps)} (step {recovered[len(recovered) // 2]})"


def chance_flag(measures: pd.DataFrame, strategy: str, task: str, d: Definition, chance: dict[str, float] | None) -> str:
    """" (base near chance)" where a seed's base R[s(t),t] is near chance (``near_chance``), and " (within
    noise)" where a seed's change from it is (``change_within_noise``); "... in k/n seeds" when not all are."""
    if not d.from_own_stage:
        return ""
    cell = measures[(measures.strategy == strategy) & (measures.task == task) & measures["value"].notna()]
    out = ""
    if chance and task in chance:
        near = sum(near_chance(base, chance[task], low) for base, low in zip(cell["base"], cell["base_ci_low"]))
        out += _flag(NEAR_CHANCE, near, len(cell))
    return out + _flag(WITHIN_NOISE, sum(bool(n) for n in cell["noise"] if n is not None), len(cell))


def _flag(text: str, count: int, seeds: int) -> str:
    if not count:
        return ""
    return f" ({text})" if count == seeds else f" ({text} in {count}/{seeds} seeds)"


def _stat_cell(s: pd.Series, d: Definition, trained_last: bool = True) -> str:
    if s["n"] == 0:
        if trained_last and d.trained_last == "undefined":
            return "undefined (trained last)"
        return "undefined (base 0)" if d.unit == "%" else "undefined"
    cell = d.format(s["mean"])
    if s["n"] >= 2:
        cell += f" ± {s['std']:.2f}"
    if s["n"] >= 3:
        cell += f" [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]"
    return cell


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False, lineterminator="\n")
    if fmt == "latex":
        return table.to_latex(index=False, escape=True)
    return to_markdown(table)


def to_markdown(table: pd.DataFrame) -> str:
    cells = [list(table.columns)] + table.astype(str).values.tolist()
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells[1:]])


def run_summary(rows: pd.DataFrame, tasks: Sequence[TaskSpec], chance: dict[str, float],
                resources: Resources) -> str:
    """What `clbench run` prints: the stage table (DESIGN.md's default threshold) and the time line."""
    table, note = run_table(rows, tasks, threshold=DEFAULT_THRESHOLD, chance=chance)
    return to_markdown(table) + "\n" + note + "\n" + resource_line(resources)


def own_stage_line(rows: pd.DataFrame, validation: pd.DataFrame, tasks: Sequence[TaskSpec]) -> str:
    """Each task right after its own stage: the test value with its 95% interval, and the validation value (with
    --val-fraction): the figures a recipe is judged by."""
    trained, parts = trained_at(rows), []
    for task in tasks:
        if task.name not in trained:
            continue
        pick = lambda frame: frame[(frame.stage == trained[task.name]) & (frame.eval_task == task.name)  # noqa: E731
                                   & (frame.metric == task.metric)]
        test = pick(rows)
        if test.empty:
            continue
        row = test.iloc[0]
        text = f"{task.name} {task.metric} {row['value']:.3f}"
        if not math.isnan(row.get("ci_low", math.nan)):
            text += f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        held = pick(validation) if not validation.empty else validation
        if not held.empty:
            text += f" (validation {held.iloc[0]['value']:.3f}, n {int(held.iloc[0]['n'])})"
        parts.append(text)
    return "After its own stage, on test [95% interval]: " + "; ".join(parts) + "." if parts else ""


def resource_line(resources: Resources) -> str:
    """One line of resources.json: time split, evaluation share per stage, peak memory, device."""
    totals, share = resources.totals(), resources.shares()["eval_share"]
    per_stage = " / ".join(f"{100 * s.shares()['eval_share']:.1f}%" for s in resources.stages.values())
    memory = resources.memory
    peak = (f"{memory['cuda_max_allocated_mb']:.0f} MB CUDA" if memory.get("cuda_max_allocated_mb") is not None
            else f"{memory['process_peak_rss_mb']:.0f} MB RSS")
    validation = sum(s.validation_seconds for s in resources.stages.values())
    held = f", of it validation {validation:.1f} s" if validation else ""
    return (f"Time: training {totals['train_seconds']:.1f} s, evaluation {totals['eval_seconds']:.1f} s{held} "
            f"({100 * share:.1f}% of stage time; per stage {per_stage}), BN audit "
            f"{totals['bn_audit_seconds']:.1f} s; peak memory {peak}; device {resources.device}.")


SMALL_SUPPORT = 10   # a class group's figure rests on fewer test images than this: flagged


def class_group_table(by_class: pd.DataFrame, tasks: Sequence[TaskSpec],
                      strategies: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """The papers' format for each class-incremental task (DESIGN.md §8): its primary metric after the last stage on
    the base classes, on the classes added after them, and on all classes (``0-15 | 16-20 | all``), mean ± std over
    seeds, each group's n (test images holding one of its classes) in its header; a group with fewer than
    ``SMALL_SUPPORT`` images is flagged. Empty without a class-incremental task."""
    frames, notes = [], []
    for task in (t for t in tasks if t.incremental):
        rows = by_class[by_class.eval_task == task.name]
        if rows.empty:
            continue
        final = rows[rows.stage == rows.stage.max()]
        base, added = group_name(task.steps[0]), group_name(tuple(c for s in task.steps[1:] for c in s))
        columns = {f"{task.metric}[{base}]": base, f"{task.metric}[{added}]": added, task.metric: "all"}
        headers = {}
        for metric, label in columns.items():
            n = final.loc[final.metric == metric, "n"]
            support = int(n.iloc[0]) if not n.empty else 0
            headers[metric] = f"{label} (n {support})" + (" †" if support < SMALL_SUPPORT else "")
        order = [s for s in strategies if s in set(final.strategy)] or sorted(set(final.strategy))
        table = pd.DataFrame([{"Task": f"{task.label} {task.metric_label}", "Strategy": strategy,
                               **{headers[m]: _mean_std(final[(final.strategy == strategy) & (final.metric == m)]
                                                        ["value"].astype(float), "{:.3f}") for m in columns}}
                              for strategy in order])
        frames.append(table)
        notes.append(f"{task.label}: {len(task.steps)} steps ({', '.join(group_name(s) for s in task.steps)}"
                     + (f", {task.mode}" if task.mode else "") + ")")
    if not frames:
        return pd.DataFrame(), ""
    small = any("†" in c for f in frames for c in f.columns)
    background = " (segmentation's background with them)" if any(t.kind == "seg" and t.incremental for t in tasks) \
        else ""
    note = ("After the last stage, as class-incremental papers report it: the primary metric on the base classes, the "
            f"first step's{background}, on every class added after them, and on all classes; n = test images "
            "holding a class of the group. " + "; ".join(notes) + "."
            + (f" † fewer than {SMALL_SUPPORT} test images: read that figure with care." if small else ""))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], note


def class_group_text(by_class: pd.DataFrame, tasks: Sequence[TaskSpec], strategies: Sequence[str] = ()) -> str:
    """``class_group_table`` in Markdown with its note; "" without a class-incremental task."""
    table, note = class_group_table(by_class, tasks, strategies)
    return "" if table.empty else to_markdown(table) + "\n\n" + note
