"""The one Markdown table writer behind every paper-layout table the commands print."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def markdown_table(df: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub pipe table: floats to `digits` decimals, missing values as '-', numbers
    right-aligned (pandas' own to_markdown needs tabulate, which we do not depend on)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def comparison(method: str, results: dict[str, Any]) -> str:
    """The embedded pretraining against an untrained trunk of its architecture, as the short
    table the demo ends on."""
    name = {"pirl": "PIRL", "npid": "NPID++", "jigsaw": "Jigsaw"}[method]
    rows = [
        (label, results[key], results[f"random_{key}"], digits)
        for label, key, digits in (
            ("kNN top-1 (k=20), %", "knn_top1", 1),  # absent with --eval-every 0
            ("linear probe res5 top-1, %", "linear_top1", 1),
            ("g retrieves own f, %", "fg_retrieval", 1),  # runs with a patch term
            ("f-g distance own/other", "fg_ratio", 3),
        )
        if key in results
    ]
    losses = [
        f"{label} {results[key]:.3f}"
        for label, key in (
            ("final training loss", "final_loss"),
            ("patch term", "final_patch_loss"),
            ("image term", "final_image_loss"),
        )
        if key in results
    ]
    lines = [
        "held-out embedded split:",
        f"{'':<28}{name:>8}{'untrained':>11}",
        *(f"{label:<28}{ours:>8.{d}f}{random:>11.{d}f}" for label, ours, random, d in rows),
        f"{', '.join(losses)} (chance level {results['chance_loss']:.3f})",
    ]
    if "fg_retrieval_chance" in results:
        lines.append(f"retrieval at chance: {results['fg_retrieval_chance']:.1f}%")
    return "\n".join(lines)
