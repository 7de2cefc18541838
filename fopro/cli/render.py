"""Rich renderings of library results, shared by the commands that show them."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from fopro.cli.common import console

GROUP_STYLE = {"head": "green", "medium": "yellow", "tail": "bold red"}


def fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def render_eval(report: dict, title: str = "Evaluation") -> None:
    """Headline numbers, the per-class table sorted by training count, then the confusion matrix."""
    console.rule(f"[bold]{title}[/] — {report.get('split', '')} split, {report['num_samples']} images")
    tail = report.get("tail_recall")
    intervals = report.get("intervals") or {}
    console.print(
        f"balanced accuracy [bold]{with_interval(report['balanced_accuracy'], intervals.get('balanced_accuracy'))}[/]   "
        f"rare-class (tail) recall [bold red]{with_interval(tail, (intervals.get('groups') or {}).get('tail'))}[/]   "
        f"macro-F1 [bold]{with_interval(report['macro_f1'], intervals.get('macro_f1'))}[/]"
    )
    if intervals:
        console.print(f"[dim]intervals: 95 %, {intervals['method']}, {intervals['resamples']} resamples, seed {intervals['seed']}[/]")
    console.print(
        f"accuracy {fmt(report['accuracy'])}   macro AUC {fmt(report['macro_auc'], False)}   "
        f"ECE {fmt(report['ece'], False)}   MCC {fmt(report['mcc'], False)}   kappa {fmt(report['kappa'], False)}"
    )
    if report.get("groups"):
        console.print(
            "group mean recall: "
            + "   ".join(
                f"[{GROUP_STYLE[name]}]{name}[/] {fmt(group['mean_recall'])} ({len(group['classes'])} classes)"
                for name, group in report["groups"].items()
            )
        )
    render_per_class(report)
    render_confusion(report)
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def with_interval(value: float | None, interval: list[float] | None) -> str:
    """61.7% [48.3, 75.0]: a value with its 95 % interval, in percent."""
    if value is None or not interval:
        return fmt(value)
    return f"{fmt(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def operating_text(row: dict) -> str:
    """Sensitivity at each target specificity, in percent: '90.0 / 87.0'."""
    return " / ".join(f"{100 * op['sensitivity']:.1f}" for op in row.get("operating_points") or [])


def operating_header(report: dict) -> str:
    targets = next((row["operating_points"] for row in report["per_class"] if row.get("operating_points")), [])
    return "sens @ spec " + " / ".join(f"{op['target_specificity']:g}" for op in targets)


def render_per_class(report: dict) -> None:
    table = Table(title="Per class (sorted by training count); recall with its 95 % bootstrap interval; sensitivity @ specificity")
    for column in ("class", "train", "support", "precision", "recall", "specificity", "F1", "AUC", "AP", operating_header(report), "group"):
        table.add_column(column, justify="left" if column in ("class", "group") else "right")
    groups = {name: group for group, info in (report.get("groups") or {}).items() for name in info["classes"]}
    rows = sorted(report["per_class"], key=lambda r: -(r["train_count"] or 0))
    for row in rows:
        group = groups.get(row["name"], "")
        table.add_row(
            escape(row["name"]),
            "?" if row["train_count"] is None else str(row["train_count"]),
            str(row["support"]),
            fmt(row["precision"]),
            with_interval(row["recall"], row.get("recall_ci")),
            fmt(row["specificity"]),
            fmt(row["f1"]),
            fmt(row["auc"], False),
            fmt(row.get("average_precision"), False),
            operating_text(row),
            f"[{GROUP_STYLE[group]}]{group}[/]" if group else "",
        )
    console.print(table)


def render_confusion(report: dict) -> None:
    names = report["class_names"]
    table = Table(title="Confusion matrix (rows: true, columns: predicted; counts)")
    table.add_column("true \\ pred")
    for name in names:
        table.add_column(escape(name[:10]), justify="right")
    for name, row in zip(names, report["confusion_matrix"]):
        cells = [f"[bold green]{v}[/]" if i == names.index(name) else (str(v) if v else "[dim]0[/]") for i, v in enumerate(row)]
        table.add_row(escape(name), *cells)
    console.print(table)
