"""bench/run.py keeps sections it did not re-run (other machines, a GPU) and replaces the rest."""

from __future__ import annotations

import sys
import types

from bench import run as bench_run


def test_rerun_replaces_its_section_and_keeps_the_others(tmp_path, monkeypatch) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nold header line\n\n## A (bench/a.py) on CPU\n\nold a\n\n"
        "## A (bench/a.py) on a GPU\n\ngpu a\n\n## B (bench/b.py)\n\nold b\n"
    )
    fake = types.ModuleType("fakebench.a")
    fake.run = lambda: "## A (bench/a.py) on CPU\n\nnew a\n"
    monkeypatch.setitem(sys.modules, "fakebench.a", fake)
    monkeypatch.setattr(bench_run, "MODULES", ("fakebench.a",))
    monkeypatch.setattr(sys, "argv", ["run", "--out", str(out)])
    bench_run.main()
    sections = bench_run.sections_of(out.read_text())
    assert list(sections) == [
        "## A (bench/a.py) on CPU",
        "## A (bench/a.py) on a GPU",
        "## B (bench/b.py)",
    ]
    assert "new a" in sections["## A (bench/a.py) on CPU"]
    assert "old a" not in out.read_text()
    assert sections["## A (bench/a.py) on a GPU"].endswith("gpu a")
    assert sections["## B (bench/b.py)"].endswith("old b")
