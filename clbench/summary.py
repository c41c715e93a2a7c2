"""A comparison's summary: the strategies × tasks table and its footnote, the best grid setting per strategy,
``summary.{md,csv}`` and ``picked.json``, and the evaluation-share line. A view: it reads a comparison through
``clbench.reader`` and never imports a runner."""

from __future__ import annotations

import re
import statistics

import pandas as pd

from clbench import ClbenchError
from clbench.drop import DEFINITIONS
from clbench.reader import ComparisonData, Folder
from clbench.report import (
    COST_NOTE,
    SUMMARY,
    aggregate,
    class_group_text,
    comparison_table,
    cost_frame,
    cost_table,
    curve_text,
    render,
    run_measures,
)
from clbench.results import atomic_write, to_json


def also_shown(definition: str) -> tuple[str, ...]:
    """The standard metrics shown beside a forgetting definition's columns: ACC and BWT."""
    return ("acc", "bwt") if DEFINITIONS[definition].thresholded else ()


def definition_table(data: ComparisonData, definition: str, threshold: float | None = None) -> tuple[pd.DataFrame, str]:
    """One definition's strategies × tasks table (with the joint row and ACC/BWT where they apply) and its note."""
    references, reference_note = data.measured_against(definition)
    table, note = comparison_table(data.rows, data.tasks, definition, references, threshold, data.order, data.chance,
                                   joint=data.joint, also=also_shown(definition))
    return table, note + reference_note


def comparison_summary(data: ComparisonData, definition: str = "drop", threshold: float | None = None,
                       pick: str | None = None) -> tuple[pd.DataFrame, str]:
    """The summary table of a comparison and its footnote (missing cells, the picked settings)."""
    table, note = definition_table(data, definition, threshold)
    if data.missing:
        note += f" Missing (not finished, not in the table): {', '.join(data.missing)}."
    sentence = pick_settings(data, pick or "acc")[1]
    return table, note + (" " + sentence if sentence else "")


PICK = re.compile(r"(acc|forgetting)(?::plasticity>=(\d+(?:\.\d+)?))?")


def parse_pick(text: str) -> tuple[str, float | None]:
    """``acc`` | ``forgetting`` | ``forgetting:plasticity>=P`` -> (criterion, P or None)."""
    match = PICK.fullmatch(text.strip())
    if not match:
        raise ClbenchError(f"--pick {text}: expected acc, forgetting or forgetting:plasticity>=P (P in %)")
    return match.group(1), float(match.group(2)) if match.group(2) else None


def _summary_means(rows: pd.DataFrame, data: ComparisonData, definition: str, references: dict) -> dict[str, float]:
    """label -> a definition's mean over tasks, averaged over seeds, on ``rows`` (test or validation)."""
    stats = aggregate(run_measures(rows, data.tasks, definition, references))
    return dict(zip(stats.loc[stats.task == SUMMARY, "strategy"], stats.loc[stats.task == SUMMARY, "mean"]))


def pick_settings(data: ComparisonData, pick: str = "acc") -> tuple[dict[str, str], str]:
    """Each grid strategy's best setting by ``pick`` (means over seeds), and the sentence that says how and on
    what it was picked. ({}, "") without a grid."""
    groups: dict[str, list[str]] = {}
    for label in dict.fromkeys(data.rows["strategy"]):
        if "[" in label:
            groups.setdefault(label.split("[", 1)[0], []).append(label)
    if not groups:
        return {}, ""
    criterion, floor = parse_pick(pick)
    on_validation = not data.validation.empty
    rows, references = (data.validation, data.validation_references) if on_validation else (data.rows, data.references)
    acc, forgetting = _summary_means(rows, data, "acc", references), _summary_means(rows, data, "forgetting", {})
    plasticity: dict[str, float] = {}
    if floor is not None:
        reference = references or (None if on_validation else data.joint_finals())
        if not reference:
            raise ClbenchError(f"--pick {pick}: plasticity needs the single-task references"
                               + ("" if on_validation else " or the joint bound"))
        plasticity = _summary_means(rows, data, "plasticity", reference)
    picked, parts = {}, []
    for name, members in groups.items():
        allowed = [m for m in members if floor is None or plasticity.get(m, -1.0) >= floor]
        if not allowed:
            parts.append(f"{name}: none (no setting reaches plasticity {floor:g}%)")
            continue
        best = max(allowed, key=lambda m: acc[m]) if criterion == "acc" else min(allowed, key=lambda m: forgetting[m])
        picked[name] = best
        parts.append(f"{best} (ACC {acc[best]:.2f}, F {forgetting[best]:.2f}"
                     + (f", plasticity {plasticity[best]:.1f}%" if floor is not None else "") + ")")
    how = {"acc": "highest ACC", "forgetting": "lowest F"}[criterion] + \
        (f" among the settings with mean plasticity >= {floor:g}%" if floor is not None else "")
    split = data.env.get("validation", {})
    where = (f"Picked on the validation split ({split.get('fraction', 0):g} of each task's training images, held out "
             f"with --val-seed {split.get('seed', 0)}), never on the test sets the table reports." if on_validation else
             "Picked on the same test sets the table reports (no --val-fraction, so no validation split): the picked "
             "settings' figures are optimistic.")
    sentence = f"Best setting per strategy ({how}, means over seeds, on {'validation' if on_validation else 'test'}): " \
               f"{'; '.join(parts)}. {where}"
    return picked, sentence


def write_summary(data: ComparisonData, definition: str = "drop", threshold: float | None = None,
                  pick: str | None = None) -> str:
    """summary.md, summary.csv, costs.md and (with a grid) picked.json in the comparison folder; returns what
    `clbench compare` prints: summary.md's text and the cost block."""
    table, note = comparison_summary(data, definition, threshold, pick)
    picked, sentence = pick_settings(data, pick or "acc")
    if sentence:
        atomic_write(data.path / "picked.json", to_json({"criterion": pick or "acc", "picked": picked,
                                                         "sentence": sentence}))
    text = render(table, "md") + "\n\n" + note + "\n"
    curve = curve_text(data.rows, data.curve, data.tasks, data.references, data.order)
    text += "\n" + curve + "\n" if curve else ""
    groups = class_group_text(data.by_class, data.class_tasks, data.order)
    text += "\n" + groups + "\n" if groups else ""
    atomic_write(data.path / "summary.md", text)   # a pure function of the results: the same on every rerun
    atomic_write(data.path / "summary.csv", render(table, "csv"))
    cost = cost_text(data)   # times and memory differ from run to run: their own file, printed with the summary
    if cost:
        atomic_write(data.path / "costs.md", cost + "\n")
    return text + ("\n" + cost + "\n" if cost else "")


def cost_text(data: Folder) -> str:
    """The cost block in Markdown and its note ("" when no run wrote resources.json)."""
    runs = data.runs if isinstance(data, ComparisonData) else [data]
    costs = cost_frame(runs)
    if costs.empty:
        return ""
    return render(cost_table(costs, getattr(data, "order", ())), "md") + "\n\n" + COST_NOTE


def eval_share_line(data: ComparisonData) -> str:
    """The median and the highest evaluation share of a stage's time over the finished cells and stages."""
    stages = [(run.path.name, k, s) for run in data.runs if run.resources for k, s in run.resources.stages.items()]
    if not stages:
        return ""
    shares = [(s.shares()["eval_share"], name, k, s) for name, k, s in stages if s.shares()["eval_share"] is not None]
    if not shares:
        return ""
    share, cell, stage, worst = max(shares, key=lambda item: item[0])
    audit = statistics.median(s.shares()["eval_and_bn_audit_share"] for *_, s in shares)
    return (f"evaluation: {100 * statistics.median(x[0] for x in shares):.1f}% of a stage's time (median over cells "
            f"and stages; BN audit included {100 * audit:.1f}%), highest {100 * share:.1f}% ({cell} stage {stage}: "
            f"{worst.train_seconds + worst.seconds_saved_by_cache:.1f} s training, {worst.eval_seconds:.1f} s "
            "evaluation); per stage in resources.csv")
