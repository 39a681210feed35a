"""The training-ablation table is assembled from finished runs (done.json + log.jsonl) without retraining."""

from __future__ import annotations

import json

import pytest

from cvgl.bench import training


@pytest.mark.real
def test_table_from_finished_runs(tmp_path, monkeypatch):
    families = ["nadir, heading known", "oblique 30/45/60, heading known", "oblique + photometric, heading known"]
    metrics = {f: {"R@1": 0.5, "R@5": 0.7, "R@10": 0.8, "median_error_m": 42.0} for f in families}
    metrics["mean"] = {"R@1": 0.5, "R@5": 0.7, "R@10": 0.8, "median_error_m": 42.0}
    run = tmp_path / "cls-only"
    run.mkdir()
    evals = [{"event": "eval", "epoch": 2, "metrics": metrics}, {"event": "eval", "epoch": 4, "metrics": metrics}]
    (run / "done.json").write_text(json.dumps({"seconds": 300, "resumed": False, "evals": evals}))
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in (4, 8)))

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr(training.subprocess, "run", no_training)
    text = training.run(tmp_path, only=["cls-only"])
    row = next(line for line in text.splitlines() if line.startswith("| CLS-only fine-tune"))
    assert "5.0 min" in row and row.count("0.50 / 0.70 / 0.80 / 42") == 3 and row.endswith("| 0.50 |")
    assert "7.1 M + 0.39 M" in row  # last 4 of 12 ViT-S blocks + the CLS projection, counted from the config
    curve = next(line for line in text.splitlines() if line.startswith("| CLS-only") and "epoch 2" in line)
    assert curve.count("|") == 4 and "2.60 2.20" in curve
