"""The embedded demo as a user runs it: `pirl-tools pretrain` on a fresh cache, timed whole.

What `make demo` prints after the set-up: the embedded set written, PIRL pretrained with the
embedded recipe, kNN and a res5 linear probe against an untrained trunk of the same
architecture. Recorded here with this machine's wall time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run() -> str:
    """Run the demo once in a temporary cache and return the Markdown section."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PIRL_TOOLS_CACHE": str(Path(tmp) / "cache")}
        out = Path(tmp) / "demo"
        cli = [str(Path(sys.executable).parent / "pirl-tools"), "pretrain", "--out", str(out)]
        start = time.perf_counter()
        subprocess.run(cli, env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        # largest resident set of any finished descendant (Linux: KiB): the main process
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        r = json.loads((out / "results.json").read_text())
        config = json.loads((out / "config.json").read_text())
    recipe = (
        f"{config['arch']} x{config['width']:g}, {config['image_size']}-px views, "
        f"{config['epochs']} epochs, batch {config['batch_size']}, "
        f"{config['num_negatives']} negatives, {config['loss']}, T {config['temperature']:g}"
    )
    return "\n".join(
        [
            "## Embedded demo (bench/demo.py)",
            "",
            f"`pirl-tools pretrain` with an empty cache (embedded set written, then {recipe}), "
            f"one run on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; held-out "
            "split of the embedded set. Each loss term's chance level is the same "
            f"({r['chance_loss']:.3f}). g's retrieval of its own image's f is among "
            f"{100 / r['fg_retrieval_chance']:.0f} held-out images (chance "
            f"{r['fg_retrieval_chance']:.2f}%). Reproduce: `python -m bench.demo` "
            "(or `make bench`).",
            "",
            "| wall time | peak RSS (largest process) | loss | patch term | image term "
            "| kNN top-1 (k=20) | untrained | res5 linear top-1 | untrained "
            "| g retrieves own f | untrained | f-g own/other | untrained |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {seconds / 60:.1f} min | {peak_gb:.2f} GiB | {r['final_loss']:.3f} "
            f"| {r['final_patch_loss']:.3f} | {r['final_image_loss']:.3f} "
            f"| {r['knn_top1']:.1f} | {r['random_knn_top1']:.1f} "
            f"| {r['linear_top1']:.1f} | {r['random_linear_top1']:.1f} "
            f"| {r['fg_retrieval']:.1f}% | {r['random_fg_retrieval']:.1f}% "
            f"| {r['fg_ratio']:.3f} | {r['random_fg_ratio']:.3f} |",
        ]
    )


if __name__ == "__main__":
    print(run())
