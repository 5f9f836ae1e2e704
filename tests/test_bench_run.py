"""bench/run.py keeps sections it did not re-run (other machines, a GPU) and replaces the rest."""

from __future__ import annotations

import sys
import types

import pytest

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


def test_a_failing_benchmark_keeps_the_others_figures(tmp_path, monkeypatch) -> None:
    """Modules run in the order --only names them; one that raises is reported and the run
    exits non-zero, but each finished module's section is in the file as soon as it ends (a
    later crash or time-out cannot lose it)."""
    out = tmp_path / "BENCHMARKS.md"

    def two() -> str:
        assert "## One" in out.read_text()  # already written when the next module starts
        return "## Two (bench/two.py)\n\nfigure 2\n"

    modules = {}
    for name, run in (
        ("fakebench.two", two),
        ("fakebench.bad", lambda: 1 / 0),
        ("fakebench.one", lambda: "## One (bench/one.py)\n\nfigure 1\n"),
    ):
        modules[name] = types.ModuleType(name)
        modules[name].run = run
        monkeypatch.setitem(sys.modules, name, modules[name])
    monkeypatch.setattr(bench_run, "MODULES", tuple(modules))
    monkeypatch.setattr(sys, "argv", ["run", "--out", str(out), "--only", "one", "bad", "two"])
    with pytest.raises(SystemExit, match="failed: fakebench.bad"):
        bench_run.main()
    sections = bench_run.sections_of(out.read_text())
    assert list(sections) == ["## One (bench/one.py)", "## Two (bench/two.py)"]
    monkeypatch.setattr(sys, "argv", ["run", "--out", str(out), "--only", "tow"])
    with pytest.raises(SystemExit):  # a misspelt name runs nothing silently
        bench_run.main()
