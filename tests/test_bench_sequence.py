"""The ``sequence`` benchmark: its scoring against plain arithmetic, and a quick run on the real scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvgl.bench import sequence
from cvgl.bench.run import BENCHMARKS
from cvgl.geo import offset_latlon, to_latlon
from cvgl.track.simulate import Flight, FlightSpec

CRS = "EPSG:32613"


def _flight() -> Flight:
    xy = np.array([[487_100.0, 4_442_900.0], [487_110.0, 4_442_900.0], [487_120.0, 4_442_900.0]])
    return Flight(FlightSpec("t"), np.array([0.0, 1.0, 2.0]), xy, np.array([350.0, 10.0, 90.0]), np.zeros(3, bool))


def test_score_counts_skipped_frames_as_misses_and_wraps_headings() -> None:
    flight = _flight()
    lat, lon = to_latlon(CRS, flight.xy[:, 0], flight.xy[:, 1])
    east = offset_latlon(lat[1], lon[1], 30.0, 0.0)  # 30 m east of frame 1's truth
    answers = [
        {"status": "located", "lat": float(lat[0]), "lon": float(lon[0]), "heading_deg": 10.0},  # 20 deg across north
        {"status": "located", "lat": float(east[0]), "lon": float(east[1]), "heading_deg": 10.0},
        {"status": "skipped", "reason": "x"},
    ]
    err, head = sequence._score(answers, flight, CRS)
    assert err[0] == pytest.approx(0.0, abs=0.01) and err[1] == pytest.approx(30.0, abs=0.05) and np.isinf(err[2])
    assert head[0] == pytest.approx(20.0) and head[1] == pytest.approx(0.0) and np.isnan(head[2])


def test_cells_are_the_plain_statistics() -> None:
    rows = [sequence.Scored("a", False, "m", np.array([10.0, 60.0, 100.0, np.inf]), np.array([5.0, np.nan, 15.0, np.nan]), 2.0, 0.1),
            sequence.Scored("b", False, "m", np.array([1.0, 2.0]), np.array([1.0, 3.0]), 1.0, 0.4)]
    frames, r_radius, r_50, median, p90, heading, evidence, decode = sequence._cells(rows, 79.0)
    errors = np.array([10.0, 60.0, 100.0, np.inf, 1.0, 2.0])
    assert frames == "6"
    assert float(r_radius) == pytest.approx(4 / 6, abs=0.005) and float(r_50) == pytest.approx(3 / 6, abs=0.005)
    assert float(median) == pytest.approx(np.median(errors), abs=0.05)
    assert float(heading) == pytest.approx(np.median([5.0, 15.0, 1.0, 3.0]), abs=0.05)
    assert float(evidence) == pytest.approx((2.0 * 4 + 1.0 * 2) / 6, abs=0.005)
    assert float(decode) == pytest.approx((0.1 * 4 + 0.4 * 2) / 6, abs=0.0005)
    assert p90 == "inf"  # a skipped frame in the worst decile shows as such, never hidden


def test_registered() -> None:
    assert BENCHMARKS["sequence"] == "cvgl.bench.sequence"


@pytest.mark.real
def test_quick_run_on_the_longmont_scenes(tmp_path: Path) -> None:
    out = tmp_path / "sequence.md"
    assert sequence.main(["--quick", "--frames", "3", "--out", str(out)]) == 0
    text = out.read_text()
    for alignment in ("index", "saved query"):
        for method in ("locate (per frame)", "shape", "shape-causal", "particle", "particle-causal", "hmm", "hmm-causal"):
            for group in ("heading unknown", "heading known"):
                assert f"| {alignment} | {group} | {method} | 3 |" in text
        assert f"| {alignment} | all | shape | 6 |" in text
