"""`cvgl bench --assemble` rebuilds the document from kept sections, in a fixed order."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvgl.bench.run import run_all


def test_assemble_orders_sections_and_skips_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench_out").mkdir()
    (tmp_path / "bench_out" / "throughput.md").write_text("## T\n")
    (tmp_path / "bench_out" / "longmont.md").write_text("## L\n")
    out = tmp_path / "docs" / "benchmarks.md"
    text = run_all(["throughput", "real-pairs", "longmont"], out, assemble=True)
    assert out.read_text() == text
    assert text.index("## L") < text.index("## T")  # accuracy first
    assert "bench_out/" in text.splitlines()[2]
