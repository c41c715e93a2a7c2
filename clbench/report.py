"""Tables from tidy metrics rows alone: one run's stage table, a comparison's strategies × tasks summary."""

from __future__ import annotations

import math

import pandas as pd

from clbench.drop import absolute_change, drop_percent, forgetting, metric_matrix, reference_drop, trained_at
from clbench.tasks import PRIMARY_METRIC

LABELS = {"det": ("Detection", "mAP@[.5:.95]"), "seg": ("Segmentation", "mIoU"), "cls": ("Classification", "Top-1")}
DEFINITIONS = {
    "drop": ("Drop (%)", "Drop (%) = 100 x (R[S,t] - R[s(t),t]) / R[s(t),t]: R[s,t] = task t's primary metric after "
             "stage s, s(t) = the stage that trains t, S = the last stage; signed, negative = worse; the task trained "
             "last has no drop against itself; undefined when the base is 0."),
    "abs": ("Abs. change (pp)", "Abs. change = 100 x (R[S,t] - R[s(t),t]), in percentage points of the metric; "
            "signed, negative = worse."),
    "forgetting": ("Forgetting (pp)", "Forgetting (Chaudhry et al. 2018) = 100 x max over s(t) <= s < S of "
                   "(R[s,t] - R[S,t]), in percentage points; positive = forgot; undefined for the task trained last."),
    "reference": ("Drop vs single-task (%)", "Drop vs single-task = 100 x (R[S,t] - R_ref[t]) / R_ref[t], R_ref[t] = "
                  "task t trained alone with the same budget and seed; signed, negative = worse."),
}


def primary_metrics(rows: pd.DataFrame) -> dict[str, str]:
    return {task: PRIMARY_METRIC[task] for task in rows["eval_task"].unique()}


def measure(rows: pd.DataFrame, definition: str, reference: dict[str, float] | None = None) -> dict[str, float]:
    """One run's per-task value under ``definition`` (drop, reference: %; abs, forgetting: points × 100)."""
    R, trained = metric_matrix(rows, primary_metrics(rows)), trained_at(rows)
    if definition == "drop":
        values = drop_percent(R, trained)
        last = max(trained, key=trained.get)
        return {t: (math.nan if t == last else v) for t, v in values.items()}
    if definition == "abs":
        return {t: 100 * v for t, v in absolute_change(R, trained).items()}
    if definition == "forgetting":
        return {t: 100 * v for t, v in forgetting(R, trained).items()}
    if definition == "reference":
        return reference_drop(R, trained, reference or {})
    raise ValueError(f"unknown definition {definition!r}; expected one of {', '.join(DEFINITIONS)}")


def stage_table(rows: pd.DataFrame, definition: str = "drop", reference: dict[str, float] | None = None,
                threshold: float | None = None) -> pd.DataFrame:
    """The original report's layout: Task | Metric | Stage 1..S | Strategy | <definition column> [| pass/fail]."""
    R, trained = metric_matrix(rows, primary_metrics(rows)), trained_at(rows)
    values, last = measure(rows, definition, reference), max(trained.values())
    column = DEFINITIONS[definition][0]
    table = []
    for task, s_t in sorted(trained.items(), key=lambda kv: kv[1]):
        label, metric = LABELS[task]
        row = {"Task": label, "Metric": metric}
        for s in range(1, last + 1):
            row[f"Stage {s}"] = f"{R.at[s, task]:.3f}" if s >= s_t and s in R.index else "-"
        row["Strategy"] = str(rows["strategy"].iloc[0])
        row[column] = _cell(values[task], definition, trained_last=s_t == last)
        if threshold is not None:
            verdict = passes(values[task], threshold, definition)
            row[f"Within {threshold:g}"] = "-" if verdict is None else ("pass" if verdict else "FAIL")
        split = bn_attribution(rows, task, s_t, last)
        if split is not None:
            row[BN_COLUMN] = ("-" if s_t == last else "n/a (cell missing)" if math.isnan(split[0] + split[1])
                              else f"{split[0]:+.2f} / {split[1]:+.2f}")
        table.append(row)
    return pd.DataFrame(table)


def run_table(rows: pd.DataFrame, definition: str = "drop", threshold: float | None = None) -> tuple[pd.DataFrame, str]:
    """One run's stage table and its footnote (the definition, the threshold, the BN split when present)."""
    table = stage_table(rows, definition, threshold=threshold)
    note = DEFINITIONS[definition][1]
    if threshold is not None:
        unit = "%" if definition == "drop" else " pp"
        note += f"\nWithin {threshold:g}: pass when the task lost at most {threshold:g}{unit} of its own-stage value."
    return table, note + ("\n" + BN_NOTE if BN_COLUMN in table else "")


BN_COLUMN = "BN drift / weights (pp)"
BN_NOTE = ("BN drift / weights: the change R[S,t] - R[s(t),t] (x100) split into 100 x (R[S,t] - R_ownBN) and "
           "100 x (R_ownBN - R[s(t),t]), where R_ownBN re-evaluates t with the final weights but the BatchNorm "
           "statistics saved at the end of its own stage.")


def bn_attribution(rows: pd.DataFrame, task: str, own_stage: int, last: int) -> tuple[float, float] | None:
    """(part of R[S,t] - R[s(t),t] due to BN statistics, part due to weights), x 100; None when the run has no
    BN audit rows, NaNs when a cell is missing."""
    if not rows["metric"].str.endswith("_own_bn").any():
        return None
    metric = PRIMARY_METRIC[task]

    def value(stage: int, name: str) -> float:
        cell = rows[(rows["stage"] == stage) & (rows["eval_task"] == task) & (rows["metric"] == name)]["value"]
        return float(cell.iloc[0]) if len(cell) else math.nan

    own_bn, final, base = value(last, f"{metric}_own_bn"), value(last, metric), value(own_stage, metric)
    return 100 * (final - own_bn), 100 * (own_bn - base)


def _cell(value: float, definition: str, *, trained_last: bool) -> str:
    if math.isnan(value):
        if trained_last and definition in ("drop", "forgetting"):
            return "n/a (trained last)"
        return "undefined (base 0)" if definition in ("drop", "reference") else "n/a"
    return f"{value:+.2f}" + ("%" if definition in ("drop", "reference") else "")


def run_measures(rows: pd.DataFrame, definition: str,
                 references: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """Long table (strategy, seed, task, value): ``definition`` for every run in ``rows``."""
    out = []
    for (strategy, seed, _), run in rows.groupby(["strategy", "seed", "run_id"], sort=True):
        reference = (references or {}).get(int(seed))
        for task, value in measure(run, definition, reference).items():
            out.append({"strategy": strategy, "seed": int(seed), "task": task, "value": value})
    return pd.DataFrame(out, columns=["strategy", "seed", "task", "value"])


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


def passes(value: float, threshold: float, definition: str) -> bool | None:
    """Within the allowed drop? (forgetting counts upwards, the others downwards); None when undefined."""
    if math.isnan(value):
        return None
    return value <= threshold if definition == "forgetting" else value >= -threshold


def comparison_table(rows: pd.DataFrame, definition: str = "drop",
                     references: dict[int, dict[str, float]] | None = None, threshold: float | None = None,
                     strategies: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Strategies × tasks: mean ± std over seeds [95% CI], Δ vs naive (paired), pass/fail; and its footnote."""
    measures = run_measures(rows, definition, references)
    stats = aggregate(measures).set_index(["strategy", "task"])
    diffs = paired_difference(measures).set_index(["strategy", "task"])
    tasks = [t for t in ("seg", "det", "cls") if t in set(measures["task"])]
    order = [s for s in strategies or [] if s in set(rows["strategy"])] or list(dict.fromkeys(rows["strategy"]))
    table = []
    for strategy in order:
        row = {"Strategy": strategy}
        seeds = rows.loc[rows["strategy"] == strategy, "seed"].nunique()
        for task in tasks:
            s = stats.loc[(strategy, task)]
            cell = _stat_cell(s, definition) + (f" (n={int(s['n'])})" if 0 < s["n"] < seeds else "")
            if strategy != "naive" and (strategy, task) in diffs.index and not math.isnan(s["mean"]):
                cell += f"; Δ naive {diffs.loc[(strategy, task), 'mean_diff']:+.2f}"
            if threshold is not None and not math.isnan(s["mean"]):
                cell += " pass" if passes(s["mean"], threshold, definition) else " FAIL"
            row[f"{LABELS[task][0]} ({LABELS[task][1]})"] = cell
        row["seeds"] = seeds
        table.append(row)
    note = DEFINITIONS[definition][1] + " Cells: mean ± sample std over seeds, [95% t-interval] with >= 3 seeds; " \
        "Δ naive = mean of the per-seed differences to naive; (n=k): only k seeds had a defined value."
    if threshold is not None:
        note += f" pass = within {threshold:g} {'pp' if definition in ('abs', 'forgetting') else '%'} of the base."
    return pd.DataFrame(table), note


def _stat_cell(s: pd.Series, definition: str) -> str:
    if s["n"] == 0:
        return "n/a"
    unit = "%" if definition in ("drop", "reference") else ""
    cell = f"{s['mean']:+.2f}{unit}"
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

