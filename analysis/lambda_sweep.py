"""The paper's lambda ablation, small: what PIRL's patch term adds. `make lambda-sweep` pretrains
the embedded PIRL at lambda 0 (NPID++'s loss), 0.25, 0.5, 0.75 and 1 (the patch term alone);
this module gathers their results into one table and figure.

    pirl-tools analyze lambda ROOT      # ROOT/lam<lambda>/ are the pretraining run folders

Writes ROOT/lambda.csv, ROOT/lambda.md and ROOT/lambda.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from pirl.errors import UserError
from pirl.plots import save_figure
from pirl.tables import markdown_table

# results.json keys of an embedded pretraining, and the column each becomes.
COLUMNS = {
    "final_patch_loss": "patch term",
    "final_image_loss": "image term",
    "chance_loss": "chance",
    "knn_top1": "kNN top-1",
    "linear_top1": "res5 linear top-1",
    "fg_retrieval": "g retrieves own f (%)",
    "fg_ratio": "f-g own/other",
}


def lambda_table(root: Path) -> pd.DataFrame:
    """One row per run folder under root, by its config's lambda."""
    rows = []
    for run in sorted(root.glob("lam*/")):
        results, config = run / "results.json", run / "config.json"
        if not results.is_file():
            raise UserError(f"{results}: missing (the run did not finish)")
        r, cfg = json.loads(results.read_text()), json.loads(config.read_text())
        rows.append({"lambda": float(cfg["lam"]), **{v: r.get(k) for k, v in COLUMNS.items()}})
    if not rows:
        raise UserError(f"{root}: no lam*/ run folders (run `make lambda-sweep`)")
    return pd.DataFrame(rows).sort_values("lambda").astype(float)


def plot_lambda(table: pd.DataFrame, path: Path) -> Path:
    """Accuracy (left) and the heads' retrieval of their own image (right) against lambda."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for column, style in (("kNN top-1", "o-"), ("res5 linear top-1", "s-")):
        ax.plot(table["lambda"], table[column], style, label=column)
    ax.set_xlabel("lambda (weight of the patch term)")
    ax.set_ylabel("top-1 on the held-out split (%)")
    right = ax.twinx()
    right.plot(
        table["lambda"], table["g retrieves own f (%)"], "^--", color="C2", label="g finds own f"
    )
    right.set_ylabel("g retrieves own f (%)", color="C2")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="best")
    ax.set_title("PIRL's lambda ablation, embedded")
    return save_figure(fig, path)


def write_lambda(root: Path) -> Path:
    """lambda.csv, lambda.md and lambda.png under root; returns the Markdown file."""
    table = lambda_table(root)
    table.to_csv(root / "lambda.csv", index=False)
    plot_lambda(table, root / "lambda.png")
    path = root / "lambda.md"
    path.write_text(markdown_table(table, digits=3))
    return path
