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
