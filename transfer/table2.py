"""Table 2 of the paper: linear probes of every encoder on every benchmark whose data is present.

    pirl-tools transfer table2 [--weights NAME=PATH ...] [--data DIR] --out DIR

DIR of --data holds voc07/, imagenet/, places205/, inat18/, each in its real layout
(transfer/datasets.py); a benchmark whose folder is missing or unreadable is skipped with its
reason. With no --data the embedded set is used (600 packaged digits-on-photos images in
the four layouts, probes on cached centre-crop features); with no --weights the rows are a
randomly initialised trunk (the floor) and, unless --no-pretrain, a PIRL model pretrained on
the embedded set (pirl.pretrain.embedded_checkpoint: trained once into the cache, then reused).
Writes OUT/table2.md and OUT/table2.csv (Method, Parameters, ImageNet, VOC07, Places205, iNat.)
and one run folder per (method, benchmark) under OUT/runs. An OUT that already holds a table is
refused before any compute unless build_table2 is given overwrite=True, which replaces its runs.
"""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from pirl.errors import UserError
from pirl.spec import parse_weights
from pirl.tables import markdown_table
from transfer.datasets import BENCHMARKS, SPLITS, load_split
from transfer.linear_probe import run_linear

COLUMNS = {"imagenet": "ImageNet", "voc07": "VOC07", "places205": "Places205", "inat18": "iNat."}
RANDOM_SPEC = "random=random:resnet18@0.25"


def find_benchmarks(data_root: Path) -> tuple[dict[str, Path], list[str]]:
    """Benchmarks whose data reads correctly under data_root, and a line per one skipped."""
    found, skipped = {}, []
    for bench in BENCHMARKS:
        folder = data_root / bench
        if not folder.is_dir():
            skipped.append(f"{COLUMNS[bench]}: skipped, no folder {folder}")
            continue
        try:
            for split in SPLITS[bench]:
                load_split(bench, folder, split)
        except UserError as exc:
            skipped.append(f"{COLUMNS[bench]}: skipped, {exc}")
            continue
        found[bench] = folder
    return found, skipped


def assemble(results: list[dict]) -> pd.DataFrame:
    """One row per method in the paper's layout; '-' where a benchmark was not run."""
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(r["method"], {"Method": r["method"]})
        row["Parameters"] = f"{r['parameters'] / 1e6:.1f}M"
        row[COLUMNS[r["benchmark"]]] = round(float(r["value"]), 1)
    table = pd.DataFrame(list(rows.values()), columns=["Method", "Parameters", *COLUMNS.values()])
    return table.astype(object).fillna("-")


def pretrained_embedded(device: str) -> tuple[str | None, str]:
    """The shared embedded PIRL checkpoint, or why there is none (the table goes on without)."""
    from pirl.pretrain import embedded_checkpoint

    try:
        return str(embedded_checkpoint("pirl", device)), ""
    except UserError as exc:
        return None, f"pirl: skipped, embedded pretraining failed ({exc})"


def build_table2(
    weights: list[str],
    data_root: Path | None,
    out: Path,
    layer: str = "res5",
    epochs: int | None = None,
    augment: bool | None = None,
    device: str = "auto",
    pretrain: bool = True,
    overwrite: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """Run every (encoder, present benchmark) probe and write table2.md and table2.csv; an
    existing table in `out` is refused up front (not at its first run folder, halfway) unless
    overwrite, which replaces each run folder it writes."""
    _check_out(out, weights, overwrite)
    notes: list[str] = []
    if data_root is None:
        benches = {b: None for b in BENCHMARKS}
        augment = False if augment is None else augment
    else:
        benches, notes = find_benchmarks(Path(data_root))
        augment = True if augment is None else augment
    if not weights:
        weights = [RANDOM_SPEC]
        if pretrain:
            ckpt, why = pretrained_embedded(device)
            weights += [f"pirl={ckpt}"] if ckpt else []
            notes += [why] if why else []
    results = []
    for spec in weights:
        method, _ = parse_weights(spec)
        for bench, folder in benches.items():
            click.echo(f"table2: {method} on {bench}", err=True)
            results.append(
                run_linear(
                    spec,
                    bench,
                    folder,
                    layer,
                    out / "runs" / method / bench,
                    device,
                    epochs=epochs,
                    augment=augment,
                    num_workers=0,
                    overwrite=overwrite,
                )
            )
    table = assemble(results)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table2.csv", index=False)
    source = "embedded set" if data_root is None else str(data_root)
    lines = [
        f"# Table 2: linear probes ({layer}; data: {source})",
        "",
        markdown_table(table),
        "",
    ]
    lines += [f"- {n}" for n in notes]
    (out / "table2.md").write_text("\n".join(lines) + "\n")
    return table, notes


def _check_out(out: Path, weights: list[str], overwrite: bool) -> None:
    """Refuse, before any compute, an OUT holding a table and --weights naming one method twice
    (either would stop the table halfway, at a run folder that already exists)."""
    names = [parse_weights(w)[0] for w in weights]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--weights: method {repeated[0]!r} given twice; use distinct NAME=PATH")
    held = [p for p in (out / "table2.md", out / "table2.csv", out / "runs") if p.exists()]
    if held and not overwrite:
        raise UserError(
            f"{out}: a Table 2 exists here ({held[0].name}); pass --overwrite to replace it, "
            "or choose another --out"
        )
