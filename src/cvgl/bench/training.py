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
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cvgl.bench.common import emit_section, machine_line
from cvgl.train.config import load_config


@dataclass(frozen=True)
class Recipe:
    """One table: the configs of a folder, trained in ``priority`` order, shown in ``rows`` order."""

    folder: Path
    title: str
    zero_shot: list[tuple[str, int]]  # (preset, input px) rows evaluated on the same photos
    rows: list[tuple[str, str | None]]  # (label, config name); None = the zero-shot rows
    priority: list[str]  # run order when time is short
    base: str = "gengeo-s"  # the config whose data/optim/eval settings the table's caption states


CONFIGS = Path("configs/longmont")
# The paper's recipe at CPU scale. Zero-shot rows: the default descriptor (block 8) and the
# last-block CLS token every trained head starts from.
PAPER = Recipe(
    folder=CONFIGS,
    title="Training ablation on Longmont (GenGeo-S, CPU scale)",
    zero_shot=[("gem-l8-raw", 168), ("gem-l8-raw", 224), ("cls", 168)],
    rows=[
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
    ],
    # The method itself first, then the ablations the paper leans on.
    priority=["gengeo-s", "cls-only", "salad-no-dustbin", "salad-nonshared", "netvlad-shared", "salad-frozen",
              "salad-k32", "salad-full", "gengeo-s-long"],
)
# The small-data recipe (configs/longmont/small-data/): every row has the same pairs and steps as the
# full recipe unless its label says otherwise; one change per row, so each row measures one idea.
SMALL_DATA = Recipe(
    folder=CONFIGS / "small-data",
    title="GenGeo-S, small-data recipe vs the paper's, on Longmont (all six families)",
    zero_shot=[("gem-l8-raw", 168), ("gem-l8-raw", 224)],
    rows=[
        ("zero-shot", None),
        ("paper recipe (block 12, last 4 blocks trained, random SALAD), same pairs and steps", "paper-recipe"),
        ("**GenGeo-S small-data: block 8, frozen, residual, token init, rotation jitter, 1024 pairs**", "gengeo-s"),
        ("- without query rotation jitter", "no-rotation-jitter"),
        ("- with wrong-heading negatives (3 of each photo's 15 wrong headings)", "wrong-headings"),
        ("- blocks 5-8 trained (the paper's last 4)", "last4"),
        ("- blocks 5-8 trained, without rotation jitter", "last4-no-jitter"),
        ("- without the residual path", "no-residual"),
        ("- random SALAD init (no PCA / k-means)", "random-init"),
        ("- head on block 12 (residual from block-12 GeM)", "block-12"),
        ("- 256 pairs (as sparse as the paper-recipe runs)", "pairs-256"),
        ("- head learning rate x1 (the paper's)", "head-lr-1"),
        ("ablation: SALAD non-shared", "nonshared"),
        ("ablation: SALAD shared, no dustbin", "no-dustbin"),
        ("ablation: NetVLAD shared", "netvlad"),
        ("ablation: CLS head", "cls"),
        ("ablation: SALAD K=32", "k32"),
    ],
    priority=["gengeo-s", "wrong-headings", "paper-recipe", "no-rotation-jitter", "last4-no-jitter", "last4", "no-residual", "random-init",
              "block-12", "pairs-256", "head-lr-1", "nonshared", "no-dustbin", "netvlad", "cls", "k32"],
)
RECIPES = {"paper": PAPER, "small-data": SMALL_DATA}


def train_run(name: str, runs: Path, folder: Path = CONFIGS) -> dict:
    """Train (or resume) ``name`` of ``folder``; returns its evaluations, wall seconds and config facts."""
    config_path = folder / f"{name}.yaml"
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


def _family_names(configured: list[str]) -> list[str]:
    from cvgl.evaluate.longmont import families

    return configured or [f.name for f in families()]


def run(runs: Path, only: list[str] | None = None, recipe: Recipe = PAPER) -> str:
    started = time.time()
    base = load_config(recipe.folder / f"{recipe.base}.yaml")
    families = _family_names(base.eval.families)
    header = ["| model | trainable (backbone + head) | train wall time | " + " | ".join(families) + " | mean R@1 |",
              "|---|---|---|" + "---|" * (len(families) + 1)]
    rows, curves, zero = [], [], {}
    results = {name: train_run(name, runs, recipe.folder) for name in recipe.priority if not only or name in only}
    for label, name in recipe.rows:
        if only and (name or "zero-shot") not in only:
            continue
        print(f"== {label} ==", flush=True)
        if name is None:
            for preset, px in recipe.zero_shot:
                result = zero_shot(families, base.eval.per_family, px, preset)
                zero[(preset, px)] = result["metrics"]
                rows.append(f"| zero-shot {preset}, {px} px (no training) | 0 | – | " + " | ".join(_cells(result["metrics"], families)) + " |")
            continue
        result = results[name]
        final = result["evals"][-1]["metrics"]
        t = result["trainable"]
        wall = f"{result['seconds'] / 60:.1f} min" + (" (resumed)" if result["resumed"] else "")
        rows.append(f"| {label} | {t['backbone'] / 1e6:.1f} M + {t['head'] / 1e6:.2f} M | {wall} | " + " | ".join(_cells(final, families)) + " |")
        curves.append(f"| {label} | " + "; ".join(f"{_when(e)}: {e['metrics']['mean']['R@1']:.2f}" for e in result["evals"])
                      + f" | {_losses(runs / name)} |")
    steps = base.data.train_pairs // base.optim.batch_size * base.optim.epochs
    lines = [
        f"## {recipe.title}",
        "",
        (f"`python -m cvgl.bench.training --recipe {_recipe_name(recipe)}` · {machine_line()} · {time.time() - started:.0f} s"
         " (runs already finished are reused)."),
        "",
        (f"Every trained row unless its label says otherwise: embedded DINOv2 ViT-S/14, {base.model.query_size[0]} px inputs,"
        f" {base.data.train_pairs} west-half pairs (WV2 drone-style photo, nadir/oblique 30/45, heading known <-> WV3 112 m tile),"
        f" {base.optim.epochs} epochs of batch {base.optim.batch_size} ({steps} steps), AdamW lr {base.optim.learning_rate:g}"
        f" (head x{base.optim.head_lr_scale:g}), cosine with warmup, symmetric InfoNCE (T0 {base.optim.temperature}, label"
        f" smoothing {base.optim.label_smoothing}), GPS-neighbour batches then DSS from epoch {base.sampling.dss_start_epoch}"
        f" (k={base.sampling.dss_k} of K={base.sampling.dss_K}), seed 0. Evaluation: east-half photos of the `longmont`"
        f" benchmark ({base.eval.per_family} per family, same photos and correctness radius as `cvgl bench longmont`),"
         " no alignment. Cells: R@1 / R@5 / R@10 / median top-1 error (m)."),
        "",
        *header,
        *rows,
        *_target_lines(results.get(recipe.base), zero, families),
        "",
        "Learning curves:",
        "",
        (f"| model | mean R@1 by epoch | training loss every {base.log_every_steps} steps (chance = ln {base.optim.batch_size}"
         f" = {math.log(base.optim.batch_size):.2f}) |"),
        "|---|---|---|",
        *curves,
    ]
    return "\n".join(lines) + "\n"


def _when(evaluation: dict) -> str:
    return "step 0" if evaluation.get("step") == 0 else f"epoch {evaluation['epoch']}"


def _recipe_name(recipe: Recipe) -> str:
    return next(name for name, r in RECIPES.items() if r is recipe)


def _target_lines(result: dict | None, zero: dict, families: list[str]) -> list[str]:
    """Issue 16's bar: the base row's R@1 minus each zero-shot row's, per family (target: >= +0.10 in every one)."""
    if result is None or not zero:
        return []
    final = result["evals"][-1]["metrics"]
    lines = ["", "Gain of the recipe's main row over zero-shot, R@1 per family (target: at least +0.10 in every family):", ""]
    lines += ["| against | " + " | ".join(families) + " | mean | every family >= +0.10 |", "|---|" + "---|" * (len(families) + 2)]
    for (preset, px), metrics in zero.items():
        gains = [final[f]["R@1"] - metrics[f]["R@1"] for f in families]
        mean = final["mean"]["R@1"] - metrics["mean"]["R@1"]
        lines.append(f"| zero-shot {preset}, {px} px | " + " | ".join(f"{g:+.2f}" for g in gains)
                     + f" | {mean:+.2f} | {'yes' if min(gains) >= 0.10 else 'no'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper", help="which table (configs folder)")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: runs/longmont[/small-data])")
    parser.add_argument("--only", nargs="*", default=None, help="config names (and/or zero-shot) to include")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    runs = args.runs or Path("runs") / recipe.folder.relative_to("configs")
    return emit_section(run(runs, args.only, recipe), args.out)


if __name__ == "__main__":
    sys.exit(main())
