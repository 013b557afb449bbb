"""A benchmark's results for people: the per-category table (stderr), the metrics JSON and the chart
beside the answers file (ANSWERS.metrics.json, ANSWERS.metrics.png), and the outside grader's file
(ANSWERS.upload.json: vqav2's EvalAI upload, mmvet's grader input)."""

import json
import os
from pathlib import Path

from ..plots import plot_scores
from .result import Result


def beside(answers: Path, suffix: str) -> Path:
    """ANSWERS.<suffix> beside the answers file (answers.jsonl -> answers.metrics.json)."""
    return answers.with_name(f"{answers.stem}.{suffix}")


def value_name(task: str) -> str:
    """What a task's per-category figures are: MME's are scores (acc + acc+, up to 200), else accuracies."""
    return "score" if task == "mme" else "accuracy"


def _number(value) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else f"{value:.2f}"


def groups(result: Result) -> list[tuple[str, list[str], dict]]:
    """The metrics' tables: (title, columns, {row: [values]}) for each grouping (categories, GQA's
    structural types, MMBench's l2-categories, ...). A grouping of records (POPE's splits) has their
    keys as columns; one of numbers has one column, and the groupings of numbers after it over the same
    rows add theirs (MME's score, acc and acc_plus per subtask)."""
    tables: list = []
    numbers = None  # the last table of numbers, while the next grouping may join it
    for key, group in result.metrics.items():
        if not isinstance(group, dict) or not group:
            continue
        if all(isinstance(value, dict) for value in group.values()):
            columns = list(dict.fromkeys(name for row in group.values() for name in row))
            tables.append((key, columns, {row: [values.get(c) for c in columns] for row, values in group.items()}))
            numbers = None
        elif numbers is not None and list(numbers[2]) == list(group):
            numbers[1].append(key)
            for row, value in group.items():
                numbers[2][row].append(value)
        else:
            numbers = (key, [value_name(result.task)], {row: [value] for row, value in group.items()})
            tables.append(numbers)
    return tables


def format_table(result: Result) -> str:
    """The headline metrics, then each grouping's table, aligned for a terminal."""
    lines = [f"{result.task}: {result.count} questions"]
    headline = {key: value for key, value in result.metrics.items() if not isinstance(value, dict)}
    width = max((len(key) for key in headline), default=0)
    lines += [f"  {key:<{width}}  {_number(value):>8}" for key, value in headline.items()]
    for title, columns, rows in groups(result):
        first = max(len(title), *(len(str(row)) for row in rows))
        widths = [max(len(column), 8) for column in columns]
        lines.append("")
        lines.append("  ".join([f"{title:<{first}}", *(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]))
        for row, values in rows.items():
            cells = ["" if v is None else _number(v) for v in values]
            lines.append("  ".join([f"{row!s:<{first}}", *(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))]))
    return "\n".join(lines)


def chart_series(result: Result) -> dict[str, dict[str, float]]:
    """The chart's bars, {figure: {category: value}}: each category's value (POPE: each figure of its
    splits but the count), else the headline metrics."""
    categories = result.metrics.get("categories")
    if not categories:
        headline = {key: value for key, value in result.metrics.items() if not isinstance(value, dict)}
        return {value_name(result.task): headline}
    if all(isinstance(row, dict) for row in categories.values()):
        names = dict.fromkeys(name for row in categories.values() for name in row if name != "count")
        return {name: {c: row[name] for c, row in categories.items() if name in row} for name in names}
    return {value_name(result.task): categories}


def write_results(result: Result, answers: Path) -> tuple[Path, Path]:
    """Writes the metrics JSON (Result.to_json(), as `--json` prints it) and the chart beside the answers
    file; returns their paths."""
    metrics, chart = beside(answers, "metrics.json"), beside(answers, "metrics.png")
    temp = metrics.with_name(metrics.name + ".tmp")
    temp.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(temp, metrics)
    unit, best = ("score (acc + acc+)", 200.0) if result.task == "mme" else ("%", 100.0)
    plot_scores(chart_series(result), chart, title=f"{result.task} ({result.count} questions)", ylabel=unit, ymax=best)
    return metrics, chart
