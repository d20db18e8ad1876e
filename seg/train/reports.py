"""Evaluation reports people can look at: JSON, per-class tables, an IoU bar chart and a confusion matrix.

:func:`write_report` writes, from the scores of :class:`~seg.train.metrics.SegmentationMetric` (the callback
:class:`~seg.train.callbacks.report.SegmentationReport` calls it at the end of every ``validate`` and ``test`` run)::

    metrics.json        mIoU / mAcc / aAcc and per-class IoU / Acc / pixel counts (fractions in [0, 1], NaN -> null)
    per_class.md        per-class table sorted by IoU (descending, classes never seen last), values x100
    per_class.csv       the same table as CSV (fractions, empty cells for NaN)
    per_class_iou.png   horizontal bar chart of per-class IoU (best and worst 20 when there are more than 40)
    confusion.png       row-normalised confusion matrix of the most confused classes (at most 20)

and :func:`summary_text` makes the short block printed after a run (mIoU / mAcc / aAcc x100, the five worst
classes).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from seg.data.spec import UINT8_MAX, make_palette

__all__ = [
    "class_table",
    "most_confused",
    "plot_confusion",
    "plot_per_class_iou",
    "summary_text",
    "write_report",
]


def _num(value: float) -> float | None:
    """A JSON-safe float: NaN becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def class_table(scores: dict[str, Tensor], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class, sorted by IoU (descending; NaN classes last, each group by class id).

    Returns:
        dicts with ``id``, ``name``, ``IoU`` and ``Acc`` (fractions, None where NaN), ``label_pixels`` (pixels
        labelled with the class) and ``pred_pixels`` (labelled pixels predicted as the class).
    """
    iou = scores["IoU"].double().cpu().numpy()
    acc = scores["Acc"].double().cpu().numpy()
    confmat = scores["confusion_matrix"].cpu().numpy()
    if not len(class_names) == len(iou) == len(acc) == len(confmat):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} per-class scores")
    rows = [
        {
            "id": k,
            "name": str(class_names[k]),
            "IoU": _num(iou[k]),
            "Acc": _num(acc[k]),
            "label_pixels": int(confmat[k].sum()),
            "pred_pixels": int(confmat[:, k].sum()),
        }
        for k in range(len(iou))
    ]
    return sorted(rows, key=lambda r: (r["IoU"] is None, -(r["IoU"] or 0.0), r["id"]))


def summary_text(scores: dict[str, Tensor], class_names: Sequence[str], stage: str = "val", worst: int = 5) -> str:
    """The console block: mIoU / mAcc / aAcc x100 and the ``worst`` classes by IoU."""
    rows = [r for r in class_table(scores, class_names) if r["IoU"] is not None]
    lowest = ", ".join(f"{r['name']} {_pct(r['IoU'])}" for r in rows[::-1][:worst])
    absent = len(class_names) - len(rows)
    return "\n".join([
        f"{stage} results ({len(class_names)} classes" + (f", {absent} never seen)" if absent else ")"),
        f"  mIoU {_pct(float(scores['mIoU']))}   mAcc {_pct(float(scores['mAcc']))}   "
        f"aAcc {_pct(float(scores['aAcc']))}",
        f"  worst IoU: {lowest or '-'}",
    ])


def most_confused(confmat: np.ndarray, max_classes: int = 20) -> list[int]:
    """Classes with the most misclassified pixels (as label or as prediction), largest first.

    All K classes (in id order) when K <= ``max_classes``; else the top ``max_classes`` with errors.
    """
    num = len(confmat)
    if num <= max_classes:
        return list(range(num))
    off = confmat.astype(np.float64)
    np.fill_diagonal(off, 0)
    mass = off.sum(axis=0) + off.sum(axis=1)  # errors as prediction + errors as label
    order = [int(c) for c in np.argsort(-mass, kind="stable") if mass[c] > 0]
    return order[:max_classes] or list(range(max_classes))


def _save(fig: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)


def plot_per_class_iou(
    path: str | os.PathLike[str],
    scores: dict[str, Tensor],
    class_names: Sequence[str],
    title: str = "",
    show: int = 20,
    dpi: int = 100,
    palette: np.ndarray | None = None,
) -> Path:
    """Horizontal bars of per-class IoU (x100), best at the top, with the mIoU as a dashed line.

    With more than ``2 * show`` scored classes only the best and the worst ``show`` are drawn, separated by
    a row naming how many were left out. Classes never seen (NaN) are counted in the title, not drawn. Bars take
    the class colours of ``palette`` (uint8 (K, 3); default ``make_palette(K)``).
    """
    rows = [r for r in class_table(scores, class_names) if r["IoU"] is not None]
    hidden = len(rows) - 2 * show if len(rows) > 2 * show else 0
    drawn: list[dict[str, Any] | None] = [*rows[:show], None, *rows[-show:]] if hidden else list(rows)
    palette = (make_palette(len(class_names)) if palette is None else np.asarray(palette)) / UINT8_MAX
    height = 1.2 + 0.24 * max(len(drawn), 1)
    fig = Figure(figsize=(7.0, height))
    ax = fig.subplots()
    ypos = np.arange(len(drawn))[::-1]  # first row at the top
    for y, row in zip(ypos, drawn, strict=True):
        if row is None:
            ax.text(50, y, f"... {hidden} classes not shown ...", ha="center", va="center", color="0.35")
            continue
        value = 100 * row["IoU"]
        ax.barh(y, value, color=palette[row["id"]], edgecolor="0.2", linewidth=0.5, height=0.75)
        ax.text(value + 1, y, f"{value:.1f}", va="center", fontsize=7)
    ax.set_yticks(ypos, ["" if r is None else r["name"] for r in drawn], fontsize=8)
    ax.set_ylim(-0.6, len(drawn) - 0.4)
    ax.set_xlim(0, 108)
    ax.set_xlabel("IoU (%)")
    miou = 100 * float(scores["mIoU"])
    if not math.isnan(miou):
        ax.axvline(miou, color="0.3", linestyle="--", linewidth=1)
    never = len(class_names) - len(rows)
    heading = f"{title} per-class IoU, mIoU {miou:.2f}".strip() + (f" ({never} classes never seen)" if never else "")
    ax.set_title(heading, fontsize=10)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    fig.tight_layout()
    _save(fig, Path(path), dpi)
    return Path(path)


def plot_confusion(
    path: str | os.PathLike[str],
    confmat: np.ndarray,
    class_names: Sequence[str],
    max_classes: int = 20,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Row-normalised confusion matrix (label rows, prediction columns, % of the label's pixels).

    Shows the classes of :func:`most_confused`; when some classes are left out a last column "other classes"
    holds the share of each row predicted as any of them, so every drawn row still sums to 100 %.
    """
    confmat = np.asarray(confmat, dtype=np.float64)
    chosen = most_confused(confmat, max_classes)
    rows = confmat[chosen]
    fraction = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)  # (N, K): share of each label's pixels
    shown = fraction[:, chosen]
    names = [str(class_names[c]) for c in chosen]
    columns = list(names)
    if len(chosen) < len(confmat):
        shown = np.concatenate([shown, 1 - shown.sum(axis=1, keepdims=True)], axis=1)
        columns.append("other classes")
        shown[rows.sum(axis=1) == 0, -1] = 0
    side = 2.5 + 0.42 * len(columns)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(100 * shown, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(shown):
        if value >= 0.005:
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("labelled class")
    subset = f"{len(chosen)} most confused of {len(confmat)} classes" if len(chosen) < len(confmat) else "all classes"
    ax.set_title(f"{title} confusion, % of each labelled class ({subset})".strip(), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="%")
    fig.tight_layout()
    _save(fig, Path(path), dpi)
    return Path(path)


def _write_tables(directory: Path, table: list[dict[str, Any]], scores: dict[str, Tensor], stage: str) -> None:
    with open(directory / "per_class.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "id", "name", "IoU", "Acc", "label_pixels", "pred_pixels"])
        for rank, r in enumerate(table, start=1):
            writer.writerow([rank, r["id"], r["name"], "" if r["IoU"] is None else f"{r['IoU']:.6f}",
                             "" if r["Acc"] is None else f"{r['Acc']:.6f}", r["label_pixels"], r["pred_pixels"]])
    lines = [
        f"# {stage}: mIoU {_pct(float(scores['mIoU']))}, mAcc {_pct(float(scores['mAcc']))}, "
        f"aAcc {_pct(float(scores['aAcc']))}",
        "",
        "Per-class IoU and accuracy (%), sorted by IoU; `-`: class absent from labels and predictions.",
        "",
        "| rank | class | IoU | Acc | labelled pixels |",
        "|---:|---|---:|---:|---:|",
    ]
    for rank, r in enumerate(table, start=1):
        name = r["name"].replace("|", "\\|")
        lines.append(f"| {rank} | {name} | {_pct(r['IoU'])} | {_pct(r['Acc'])} | {r['label_pixels']} |")
    (directory / "per_class.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_report(
    directory: str | os.PathLike[str],
    scores: dict[str, Tensor],
    class_names: Sequence[str],
    stage: str = "val",
    extra: dict[str, Any] | None = None,
    max_confused: int = 20,
    palette: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write every report file into ``directory`` (created if missing); returns them by name.

    Args:
        scores: output of :meth:`seg.train.metrics.SegmentationMetric.compute`.
        class_names: one name per class.
        stage: ``val`` or ``test``, used in titles and the JSON.
        extra: more JSON fields (e.g. checkpoint path, global step).
        max_confused: most classes in the confusion matrix.
        palette: uint8 (K, 3) class colours of the bar chart; default ``make_palette(K)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = class_table(scores, class_names)
    summary = {key: _num(scores[key]) for key in ("mIoU", "mAcc", "aAcc")}
    payload = {"stage": stage, **(extra or {}), "num_classes": len(class_names), **summary, "per_class": table}
    files = {name: directory / name for name in
             ("metrics.json", "per_class.md", "per_class.csv", "per_class_iou.png", "confusion.png")}
    files["metrics.json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _write_tables(directory, table, scores, stage)
    plot_per_class_iou(files["per_class_iou.png"], scores, class_names, title=stage, palette=palette)
    confmat = scores["confusion_matrix"].cpu().numpy()
    plot_confusion(files["confusion.png"], confmat, class_names, max_confused, title=stage)
    return files
