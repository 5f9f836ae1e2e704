"""The paper's Table 3 (semi-supervised: top-5 after fine-tuning on 1% / 10% of the labels):
the encoders a low-shot study fine-tunes, and the table assembled from its run folders."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pirl.errors import UserError
from pirl.tables import markdown_table


def lowshot_encoders(
    pairs: Sequence[tuple[str, str]], embedded: bool, seed: int
) -> list[tuple[str, str]]:
    """(name, spec) per encoder; on the embedded set a same-shape random trunk is added, the
    floor every row is read against."""
    from pirl.weights import load_encoder

    pairs = list(pairs)
    if embedded and not any(s.startswith("random") for _, s in pairs):
        enc = load_encoder(pairs[0][1], seed=seed)
        pairs.append(("random", f"random:{enc.arch}@{enc.width:g}"))
    return pairs


def percent_label(percent: float) -> str:
    """Column name of a label fraction, as the paper writes it (1%, 10%)."""
    return f"{percent:g}%"


def read_runs(roots: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every low-shot results.json under the given folders, each with the file it came from."""
    rows = []
    for root in map(Path, roots):
        if not root.exists():
            raise UserError(f"{root}: run folder does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for path in files:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: not a readable results.json ({exc})") from None
            if not isinstance(data, dict):
                raise UserError(f"{path}: expected a JSON object")
            if "top5" not in data:
                continue  # another command's results
            missing = [k for k in ("method", "percent", "top1") if k not in data]
            if missing:
                raise UserError(f"{path}: low-shot results without {', '.join(missing)}")
            rows.append({**data, "path": str(path)})
    if not rows:
        raise UserError(f"no low-shot results.json under {', '.join(map(str, roots))}")
    return rows


def table3(rows: Iterable[Mapping[str, Any]], metric: str = "top5") -> pd.DataFrame:
    """One row per method, one column per label fraction (ascending), cells `metric` (%)."""
    cells: dict[tuple[str, float], Mapping[str, Any]] = {}
    for row in rows:
        key = (str(row["method"]), float(row["percent"]))
        if key in cells:
            raise UserError(
                f"{row.get('path', '?')}: {key[0]} at {percent_label(key[1])} is "
                f"also in {cells[key].get('path', '?')}; pass one run per cell"
            )
        cells[key] = row
    methods = list(dict.fromkeys(m for m, _ in cells))
    percents = sorted({p for _, p in cells})
    data = {
        percent_label(p): [cells[(m, p)][metric] if (m, p) in cells else math.nan for m in methods]
        for p in percents
    }
    return pd.DataFrame({"Method": methods, **data})


def write_table3(df: pd.DataFrame, out: str | Path, stem: str = "table3") -> tuple[Path, Path]:
    """Write OUT/table3.md and OUT/table3.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text("Semi-supervised fine-tuning, top-5 accuracy (%)\n\n" + markdown_table(df))
    df.to_csv(csv, index=False, float_format="%.2f")
    return md, csv
