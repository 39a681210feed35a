"""Training ablation on Longmont at CPU scale: a small version of the GenGeo paper's Tables 6-9.

Each row is one config under ``configs/longmont/`` trained with ``cvgl train`` (a subprocess per
run, resumed if a checkpoint exists) on west-half pairs (WV2 drone-style photos <-> WV3 tiles),
then evaluated with the ``longmont`` benchmark's east-half drone protocol on the heading-known
families. The zero-shot rows run the same protocol on the default zero-shot encoder. Wall-clock
times are measured here, on whatever else the machine was doing (stated in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cvgl.bench.common import emit_section, machine_line
from cvgl.train.config import load_config

# Zero-shot rows: the default descriptor (block 8) and the last-block CLS token every trained head starts from.
ZERO_SHOT = [("gem-l8-raw", 168), ("gem-l8-raw", 224), ("cls", 168)]
ROWS = [
    ("zero-shot", None),
    ("CLS-only fine-tune (last 4)", "cls-only"),
    ("NetVLAD shared (last 4)", "netvlad-shared"),
    ("SALAD non-shared (last 4)", "salad-nonshared"),
    ("SALAD shared, no dustbin (last 4)", "salad-no-dustbin"),
    ("**GenGeo-S: SALAD shared + dustbin (last 4), K=64**", "gengeo-s"),
    ("SALAD shared + dustbin, frozen backbone", "salad-frozen"),
    ("SALAD shared + dustbin, full fine-tune", "salad-full"),
    ("SALAD shared + dustbin (last 4), K=32", "salad-k32"),
    ("GenGeo-S, 3x the steps (12 epochs, DSS every 4)", "gengeo-s-long"),
]
# Run order when time is short: the method itself first, then the ablations the paper leans on.
PRIORITY = ["gengeo-s", "cls-only", "salad-no-dustbin", "salad-nonshared", "netvlad-shared", "salad-frozen", "salad-k32", "salad-full", "gengeo-s-long"]
CONFIGS = Path("configs/longmont")


def train_run(name: str, runs: Path) -> dict:
    """Train (or resume) ``name``; returns its final evaluation, wall seconds and config facts."""
    config_path = CONFIGS / f"{name}.yaml"
    config = load_config(config_path)
    out = runs / name
    done_marker = out / "done.json"
    if not done_marker.is_file():
        started = time.time()
        command = [sys.executable, "-m", "cvgl", "train", str(config_path), "--out", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        evals = [r for r in history if r.get("event") == "eval"]
        resumed = any(r.get("event") == "resumed" for r in history)
        done = {"seconds": round(time.time() - started), "resumed": resumed, "evals": evals}
        (out / "done.json").write_text(json.dumps(done))
    done = json.loads(done_marker.read_text())
    trainable = _trainable_params(config)
    return {"config": config, "trainable": trainable, **done}


def _trainable_params(config) -> dict:
    from cvgl.train.model import build_model

    model, _ = build_model(config.model, seed=config.seed)
    backbone = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.heads.parameters())
    return {"backbone": backbone, "head": head}


def zero_shot(families: list[str], per_family: int, size: int, preset: str) -> dict:
    from cvgl.evaluate.longmont import LongmontProtocol
    from cvgl.models.factory import create_encoder

    encoder = create_encoder(preset, "embedded", (size, size))
    started = time.time()
    metrics = LongmontProtocol(per_family, families).evaluate(encoder, encoder)
    return {"metrics": metrics, "seconds": round(time.time() - started)}


def _losses(run: Path) -> str:
    losses = [json.loads(line).get("loss") for line in (run / "log.jsonl").read_text().splitlines()]
    return " ".join(f"{v:.2f}" for v in losses if v is not None)


def _cells(metrics: dict, families: list[str]) -> list[str]:
    out = []
    for family in families:
        m = metrics[family]
        out.append(f"{m['R@1']:.2f} / {m['R@5']:.2f} / {m['R@10']:.2f} / {m['median_error_m']:.0f}")
    out.append(f"{metrics['mean']['R@1']:.2f}")
    return out


def run(runs: Path, only: list[str] | None = None) -> str:
    started = time.time()
    base = load_config(CONFIGS / "gengeo-s.yaml")
    families = base.eval.families
    header = ["| model | trainable (backbone + head) | train wall time | " + " | ".join(families) + " | mean R@1 |",
              "|---|---|---|" + "---|" * (len(families) + 1)]
    rows, curves = [], []
    results = {name: train_run(name, runs) for name in PRIORITY if not only or name in only}
    for label, name in ROWS:
        if only and (name or "zero-shot") not in only:
            continue
        print(f"== {label} ==", flush=True)
        if name is None:
            for preset, px in ZERO_SHOT:
                result = zero_shot(families, base.eval.per_family, px, preset)
                rows.append(f"| zero-shot {preset}, {px} px (no training) | 0 | – | " + " | ".join(_cells(result["metrics"], families)) + " |")
            continue
        result = results[name]
        final = result["evals"][-1]["metrics"]
        t = result["trainable"]
        wall = f"{result['seconds'] / 60:.1f} min" + (" (resumed)" if result["resumed"] else "")
        rows.append(f"| {label} | {t['backbone'] / 1e6:.1f} M + {t['head'] / 1e6:.2f} M | {wall} | " + " | ".join(_cells(final, families)) + " |")
        curves.append(f"| {label} | " + "; ".join(f"epoch {e['epoch']}: {e['metrics']['mean']['R@1']:.2f}" for e in result["evals"])
                      + f" | {_losses(runs / name)} |")
    lines = [
        "## Training ablation on Longmont (GenGeo-S, CPU scale)",
        "",
        f"`python -m cvgl.bench.training` · {machine_line()} · {time.time() - started:.0f} s (runs already finished are reused).",
        "",
        f"Every trained row: embedded DINOv2 ViT-S/14, {base.model.query_size[0]} px inputs, {base.data.train_pairs} west-half pairs"
        f" (WV2 drone-style photo, nadir/oblique 30/45, heading known <-> WV3 112 m tile), {base.optim.epochs} epochs of"
        f" batch {base.optim.batch_size}, AdamW lr {base.optim.learning_rate:g} (head x{base.optim.head_lr_scale:g}),"
        f" cosine with warmup, symmetric InfoNCE (T0 {base.optim.temperature}, label smoothing {base.optim.label_smoothing}),"
        f" GPS-neighbour batches then DSS from epoch {base.sampling.dss_start_epoch} (k={base.sampling.dss_k} of K={base.sampling.dss_K}),"
        " seed 0. Evaluation: east-half photos of the `longmont` benchmark (50 per family, heading known, same photos and"
        " correctness radius as `cvgl bench longmont`), no alignment. Cells: R@1 / R@5 / R@10 / median top-1 error (m).",
        "",
        *header,
        *rows,
        "",
        "Learning curves:",
        "",
        "| model | mean R@1 by epoch | training loss every 4 steps (chance = ln 32 = 3.47) |",
        "|---|---|---|",
        *curves,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/longmont"))
    parser.add_argument("--only", nargs="*", default=None, help="config names (and/or zero-shot) to include")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return emit_section(run(args.runs, args.only), args.out)


if __name__ == "__main__":
    sys.exit(main())
