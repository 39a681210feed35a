"""Throughput benchmark: encoder images/s against this machine's FLOP-bound limit and ``cvgl index``
end to end. Search latency, memory and recall per index type are :mod:`cvgl.bench.scale`.

    python -m cvgl.bench.throughput [--out FILE] [--quick]

Everything is measured in one run, on this machine, with the threads torch and faiss get by
default (reported in the header). Times are medians of >= 5 timed runs after a warm-up
(``--quick``: >= 3 runs and smaller sizes, for smoke tests only).

**FLOP count of a ViT forward pass** (per image; a multiply-add counts as 2 FLOPs; LayerNorm,
softmax, GELU, residual adds, biases and pooling are not counted - like FlopCounterMode)::

    P = (H / p) * (W / p)                  patches (p = 14)
    N = P + prefix                          tokens (prefix = class token + registers)
    C = width, F = MLP hidden width (4C)
    patch embedding     2 * P * C * (3 * p * p)
    per block           qkv        2 * 3 * N * C^2
                        attention  2 * 2 * N^2 * C      (q k^T and attn v)
                        proj       2 * N * C^2
                        MLP        2 * 2 * N * C * F    (= 16 N C^2 for F = 4C)
    total               patch embedding + blocks_run * per block

so ``2 * (12 N C^2 + 2 N^2 C)`` per block for F = 4C. Only the blocks the head needs are run
(``gem-l8``: 8 of 12). The count is cross-checked with ``torch.utils.flop_counter.FlopCounterMode``
on the real module; torch does not register a formula for the CPU fused attention op
(``_scaled_dot_product_flash_attention_for_cpu``), so it is mapped to torch's own SDPA formula.

**FLOP-bound limit** = measured dense float32 GEMM rate (``torch.matmul`` of a ViT-S MLP-shaped
``(16 * 257) x 384 @ 384 x 1536``) / GFLOP per image: the images/s the encoder would reach if every
FLOP ran at the speed of its largest GEMM. Real encoders land below it (attention, norms, GELU,
memory traffic, small-batch GEMMs).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvgl.bench.common import cpu_model, emit_section, log, markdown_table

# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], min_runs: int = 5, max_runs: int = 50, budget_s: float = 2.0,
                   warmup: int = 1) -> tuple[float, int]:
    """Median wall time of ``fn()`` over at least ``min_runs`` runs (more while under ``budget_s``).

    Returns (median seconds, number of timed runs). ``warmup`` untimed calls come first.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


# ----------------------------------------------------------------------------------------------
# FLOPs: analytic count, FlopCounterMode cross-check, GEMM rate
# ----------------------------------------------------------------------------------------------


def vit_flops(
    width: int,
    blocks: int,
    grid: tuple[int, int],
    prefix_tokens: int = 1,
    mlp_hidden: int | None = None,
    patch: int = 14,
    in_chans: int = 3,
) -> dict[str, int]:
    """Analytic forward FLOPs per image of a ViT running ``blocks`` blocks (formula: module doc)."""
    patches = grid[0] * grid[1]
    n = patches + prefix_tokens
    c = width
    f = mlp_hidden if mlp_hidden is not None else 4 * width
    parts = {
        "patch_embed": 2 * patches * c * in_chans * patch * patch,
        "qkv": 2 * 3 * n * c * c,
        "attention": 2 * 2 * n * n * c,
        "proj": 2 * n * c * c,
        "mlp": 2 * 2 * n * c * f,
    }
    per_block = parts["qkv"] + parts["attention"] + parts["proj"] + parts["mlp"]
    return {**parts, "tokens": n, "per_block": per_block, "total": parts["patch_embed"] + blocks * per_block}


def backbone_flops(backbone, input_size: tuple[int, int], blocks: int) -> dict[str, int]:
    """:func:`vit_flops` with the hyper-parameters read off a :class:`~cvgl.models.backbone.DinoV2`."""
    patch = backbone.patch_embed.patch_size[0]
    mlp = backbone.blocks[0].mlp
    if mlp.fc1.out_features != mlp.fc2.in_features:  # SwiGLU packs two projections into fc1
        hidden = (mlp.fc1.out_features + mlp.fc2.in_features) // 2
    else:
        hidden = mlp.fc1.out_features
    return vit_flops(
        width=backbone.embed_dim,
        blocks=blocks,
        grid=(input_size[0] // patch, input_size[1] // patch),
        prefix_tokens=backbone.num_prefix_tokens,
        mlp_hidden=hidden,
        patch=patch,
        in_chans=backbone.patch_embed.proj.in_channels,
    )


def counted_flops(backbone, input_size: tuple[int, int], blocks: int) -> int:
    """FLOPs per image as counted by ``FlopCounterMode`` on one forward pass up to ``blocks``."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_registry:
        mapping[cpu_sdpa] = cpu_sdpa_flop
    images = torch.zeros(1, 3, *input_size)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        backbone.forward_layers(images, [blocks])
    return int(counter.get_total_flops())


@dataclass
class GemmResult:
    label: str
    shape: tuple[int, int, int, int]  # batch, m, k, n
    gflops: float
    seconds: float
    runs: int


def gemm_gflops(label: str, m: int, k: int, n: int, batch: int = 1, min_runs: int = 5) -> GemmResult:
    """Median float32 GFLOP/s of ``torch.matmul`` ``[batch,] m x k @ k x n`` (2 m k n FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    lead = (batch,) if batch > 1 else ()
    a = torch.randn(*lead, m, k, generator=gen)
    b = torch.randn(*lead, k, n, generator=gen)
    out = torch.empty(*lead, m, n)
    flops = 2.0 * batch * m * k * n
    with torch.inference_mode():
        torch.matmul(a, b, out=out)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        once = max(time.perf_counter() - t0, 1e-6)
        reps = max(1, math.ceil(0.05 / once))  # each timed run lasts >= ~50 ms

        def run() -> None:
            for _ in range(reps):
                torch.matmul(a, b, out=out)

        seconds, runs = median_seconds(run, min_runs=min_runs, max_runs=min_runs + 10, budget_s=1.0, warmup=0)
    seconds /= reps
    return GemmResult(label, (batch, m, k, n), flops / seconds / 1e9, seconds, runs)


# ----------------------------------------------------------------------------------------------
# Encoder throughput
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderResult:
    preset: str
    blocks: int
    depth: int
    size: int
    batch: int
    seconds_per_batch: float
    runs: int
    gflop_analytic: float
    gflop_counted: float

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds_per_batch


def time_encoder(encoder, size: int, batch: int, min_runs: int = 5) -> tuple[float, int]:
    """Median seconds of ``encoder.forward`` on a ``[batch, 3, size, size]`` tensor (pixels -> descriptor)."""
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return median_seconds(lambda: encoder(images), min_runs=min_runs, max_runs=30, budget_s=3.0,
                              warmup=2 if batch == 1 else 1)


def deepest_block(encoder) -> int:
    return max(encoder._layers.values())


# ----------------------------------------------------------------------------------------------
# End-to-end indexing of the Longmont raster
# ----------------------------------------------------------------------------------------------


@dataclass
class IndexRunResult:
    tiles: int
    read_s: float  # iter_tiles alone, median of 3 passes
    encode_s: float  # Encoder.encode on the tiles already in memory
    build_s: float  # build_index (read + encode + alignment + write)
    load_s: float  # create_encoder with cached weights
    cli_s: float | None  # the `cvgl index` command in a subprocess (Python start, imports, load, build)


def index_run(weights: str = "embedded", cli: bool = True) -> IndexRunResult:
    """Time indexing Longmont WV3 (112 m tiles, stride 56 m, 0.5 m GSD, default encoder) several ways."""
    import subprocess

    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles
    from cvgl.index.build import build_index
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    spec = TilingSpec(tile_m=112.0, stride_m=56.0, gsd_m=0.5)
    path = longmont_scene("wv3")
    t0 = time.perf_counter()
    encoder = create_encoder(DEFAULT_PRESET, weights)
    load_s = time.perf_counter() - t0
    images: list[np.ndarray] = []

    def read() -> None:
        images.clear()
        images.extend(tile.image for tile in iter_tiles(path, spec))

    read_s, _ = median_seconds(read, min_runs=3, max_runs=3, budget_s=0.0, warmup=1)
    t0 = time.perf_counter()
    encoder.encode(images, batch_size=16)
    encode_s = time.perf_counter() - t0
    cli_s = None
    with tempfile.TemporaryDirectory(prefix="cvgl-bench-") as tmp:
        t0 = time.perf_counter()
        build_index(path, Path(tmp) / "index", encoder, spec, progress=False)
        build_s = time.perf_counter() - t0
        if cli:
            command = [sys.executable, "-m", "cvgl", "index", str(path), "--out", str(Path(tmp) / "cli-index"),
                       "--tile-m", "112", "--stride-m", "56", "--gsd", "0.5", "--weights", weights]
            t0 = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cli_s = time.perf_counter() - t0
    return IndexRunResult(len(images), read_s, encode_s, build_s, load_s, cli_s)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


class CpuMonitor:
    """How much CPU *other* processes used while we measured (machine busy time minus our own).

    The machine is shared; a timing taken while something else ran is not this code's speed. Each
    section reports the average number of cores others kept busy (from ``/proc/stat``), so a
    contaminated number is visible in the output instead of silently slow.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        import resource

        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        own = sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        return time.perf_counter(), (user + nice + system + irq + softirq) / ticks, steal / ticks, own

    def restart(self) -> None:
        self._start = self._snapshot()

    def others(self) -> str:
        """'other processes: X cores on average (steal Y)' since the last restart."""
        end = self._snapshot()
        if self._start is None or end is None:
            return "CPU use of other processes: unknown (no /proc/stat)"
        wall = max(end[0] - self._start[0], 1e-9)
        others = max(0.0, (end[1] - self._start[1]) - (end[3] - self._start[3])) / wall
        steal = (end[2] - self._start[2]) / wall
        return (f"other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during this section"
                f" (hypervisor steal {steal:.2f} cores)")


def machine_header(argv: Sequence[str]) -> list[str]:
    import faiss

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        (f"Machine: {platform.platform()} | CPU: {cpu_model()} | cores: {os.cpu_count()} logical, "
        f"{usable} usable | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads) | numpy {np.__version__} | "
        f"Python {platform.python_version()} | load average at start: {load}"),
        "",
        "Command: `python -m cvgl.bench.throughput" + ("" if not argv else " " + shlex.join(argv)) + "`",
    ]


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


@dataclass
class Config:
    sizes: tuple[int, ...] = (224, 448)
    batches: tuple[int, ...] = (1, 16)
    presets: tuple[str, ...] = ("gem-l8", "gem")
    min_runs: int = 5
    weights: str = "embedded"
    sections: tuple[str, ...] = ("encoder", "index")


def run(config: Config, argv: Sequence[str], log: Callable[[str], None]) -> str:
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    started = time.perf_counter()
    title = "## Benchmark `throughput` (encoder vs FLOP-bound limit, `cvgl index`)"
    lines = [title, ""] + machine_header(argv) + [""]

    monitor = CpuMonitor()
    # -- 1 + 2: encoder throughput and the FLOP-bound limit ------------------------------------
    ref_rate: float | None = None  # pure-encoder images/s, default preset, batch 16, 224 px
    encoders = {}
    if "encoder" in config.sections:
        for preset in config.presets:
            encoders[preset] = create_encoder(preset, config.weights, (224, 224))
    if "encoder" in config.sections:
        log("GEMM rates")
        tokens = {s: (s // 14) ** 2 + 1 for s in config.sizes}
        big = 16 * tokens.get(224, (224 // 14) ** 2 + 1)
        width = next(iter(encoders.values())).backbone.embed_dim
        heads = next(iter(encoders.values())).backbone.blocks[0].attn.num_heads
        hidden = 4 * width
        gemms = [gemm_gflops(f"MLP fc1 ({16}x{big // 16} tokens)", big, width, hidden, min_runs=config.min_runs)]
        headline = gemms[0]
        gemms += [
            gemm_gflops("qkv", big, width, 3 * width, min_runs=config.min_runs),
            gemm_gflops("proj", big, width, width, min_runs=config.min_runs),
            gemm_gflops("MLP fc2", big, hidden, width, min_runs=config.min_runs),
            gemm_gflops(f"attention q k^T (batch 16 x {heads} heads)", tokens.get(224, 257), width // heads,
                        tokens.get(224, 257), batch=16 * heads, min_runs=config.min_runs),
        ]
        fc1_rate = {big: headline.gflops}  # fc1-shaped GEMM rate by row count (batch x tokens)
        for size in config.sizes:
            for batch in config.batches:
                rows = batch * tokens[size]
                if rows not in fc1_rate:
                    gemms.append(gemm_gflops(f"MLP fc1 at batch {batch}, {size} px", rows, width, hidden,
                                             min_runs=config.min_runs))
                    fc1_rate[rows] = gemms[-1].gflops
        results: list[EncoderResult] = []
        for preset in config.presets:
            encoder = encoders[preset]
            blocks = deepest_block(encoder)
            for size in config.sizes:
                analytic = backbone_flops(encoder.backbone, (size, size), blocks)["total"]
                counted = counted_flops(encoder.backbone, (size, size), blocks)
                for batch in config.batches:
                    log(f"encoder {preset} {size}px batch {batch}")
                    seconds, runs = time_encoder(encoder, size, batch, config.min_runs)
                    results.append(EncoderResult(preset, blocks, encoder.backbone.depth, size, batch, seconds, runs,
                                                 analytic / 1e9, counted / 1e9))
                    if preset == DEFAULT_PRESET and size == 224 and batch == 16:
                        ref_rate = results[-1].images_per_s
        lines += [
            "### 1. Encoder throughput (pixels -> descriptor, `Encoder.forward` on ready tensors)",
            "",
            f"torch threads: {torch.get_num_threads()}; median of >= {config.min_runs} timed runs after a "
            "warm-up; weights: " + config.weights + ".",
            "",
        ]
        rate = headline.gflops
        rows = []
        for r in results:
            limit = rate / r.gflop_analytic
            matched = fc1_rate[r.batch * tokens[r.size]] / r.gflop_analytic
            rows.append([
                r.preset,
                f"{r.blocks}/{r.depth}", r.size, r.batch, f"{r.images_per_s:.2f}",
                f"{r.seconds_per_batch * 1e3:.1f}", r.runs, f"{r.gflop_analytic:.2f}",
                f"{r.images_per_s * r.gflop_analytic:.1f}", f"{limit:.2f}", f"{r.images_per_s / limit:.0%}",
                f"{r.images_per_s / matched:.0%}",
            ])
        lines += markdown_table(
            ["encoder", "blocks run", "input px", "batch", "images/s", "ms/batch", "runs", "GFLOP/image",
             "achieved GFLOP/s", "FLOP-bound limit (images/s)", "measured / limit",
             "measured / limit at this batch's fc1 GEMM rate"],
            rows,
        )
        lines += [
            "",
            "### 2. FLOP-bound limit",
            "",
            (f"Limit = dense GEMM rate {rate:.1f} GFLOP/s (float32 `torch.matmul` "
            f"{big}x{width} @ {width}x{hidden}, the MLP fc1 of batch 16 at 224 px) / analytic GFLOP per image. "
            "The last column of section 1 uses instead the rate of the fc1 GEMM at that batch and input size "
            "(batch x N rows), i.e. how far the encoder is from its own biggest GEMM."),
            "",
            "GEMM rates measured in this run (median):",
            "",
        ]
        lines += markdown_table(
            ["GEMM", "shape (batch, m, k, n)", "GFLOP/s", "ms each", "runs"],
            [[g.label, "x".join(map(str, g.shape)), f"{g.gflops:.1f}", f"{g.seconds * 1e3:.2f}", g.runs]
             for g in gemms],
        )
        lines += ["", f"While sections 1-2 ran, {monitor.others()}."]
        lines += ["", "FLOPs per image: analytic formula vs `torch.utils.flop_counter.FlopCounterMode`:", ""]
        seen = set()
        flop_rows = []
        for r in results:
            key = (r.preset, r.size)
            if key in seen:
                continue
            seen.add(key)
            parts = backbone_flops(encoders[r.preset].backbone, (r.size, r.size), r.blocks)
            flop_rows.append([
                r.preset, f"{r.blocks}/{r.depth}", r.size, parts["tokens"], f"{parts['patch_embed'] / 1e9:.3f}",
                f"{parts['per_block'] / 1e9:.3f}", f"{parts['attention'] / parts['per_block']:.0%}",
                f"{r.gflop_analytic:.3f}", f"{r.gflop_counted:.3f}",
                f"{(r.gflop_counted - r.gflop_analytic) / r.gflop_analytic:+.2%}",
            ])
        lines += markdown_table(
            ["encoder", "blocks", "input px", "tokens N", "patch embed GFLOP", "GFLOP/block", "attention share",
             "analytic GFLOP", "FlopCounterMode GFLOP", "difference"],
            flop_rows,
        )
        lines += [
            "",
            ("Per block: qkv 2·3NC² + attention 2·2N²C + proj 2NC² + MLP 2·2NC·4C = 2(12NC² + 2N²C); patch "
            "embedding 2·P·C·3·14²; LayerNorm/GELU/softmax/bias not counted. FlopCounterMode has no formula "
            "for the CPU fused attention op in this torch, so it is mapped to torch's own SDPA formula."),
            "",
        ]

    # -- 3: cvgl index end to end ----------------------------------------------------------------
    if "index" in config.sections:
        log("cvgl index on Longmont WV3")
        monitor.restart()
        if ref_rate is None:
            encoder = encoders.get(DEFAULT_PRESET) or create_encoder(DEFAULT_PRESET, config.weights)
            seconds, _ = time_encoder(encoder, 224, 16, config.min_runs)
            ref_rate = 16 / seconds
        res = index_run(config.weights)
        build_rate = res.tiles / res.build_s
        rows = [
            ["read tiles only (`iter_tiles`, median of 3 passes)", res.tiles, f"{res.read_s:.2f}",
             f"{res.tiles / res.read_s:.1f}", "-"],
            ["`Encoder.encode` on the tiles in memory (PIL->tensor + forward, batch 16)", res.tiles,
             f"{res.encode_s:.2f}", f"{res.tiles / res.encode_s:.2f}", f"{res.tiles / res.encode_s / ref_rate:.0%}"],
            ["`build_index` (read + encode + alignment + write to a temp dir)", res.tiles, f"{res.build_s:.2f}",
             f"{build_rate:.2f}", f"{build_rate / ref_rate:.0%}"],
        ]
        if res.cli_s is not None:
            rows.append(["`cvgl index` command (subprocess: Python start, imports, model load, build)", res.tiles,
                         f"{res.cli_s:.2f}", f"{res.tiles / res.cli_s:.2f}", f"{res.tiles / res.cli_s / ref_rate:.0%}"])
        rows.append(["pure encoder `forward`, batch 16, 224 px (section 1, this run)", "-", "-", f"{ref_rate:.2f}",
                     "100%"])
        lines += [
            "### 3. `cvgl index` end to end (Longmont WV3, 112 m tiles, stride 56 m, 0.5 m GSD, default encoder)",
            "",
        ]
        lines += markdown_table(["stage", "tiles", "seconds", "tiles/s", "vs pure encoder (batch 16, 224 px)"], rows)
        lines += [
            "",
            (f"Model load in-process (`create_encoder`, weights already converted and cached): {res.load_s:.2f} s. "
            f"While section 3 ran, {monitor.others()}."),
            "",
        ]

    lines += [f"Total run time: {time.perf_counter() - started:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cvgl.bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here (atomically)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 224 px only, >= 3 runs")
    parser.add_argument("--sections", default="encoder,index", help="subset of encoder,index")
    parser.add_argument("--weights", default="embedded", help="encoder weights (embedded | PATH | random:<arch>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = Config(weights=args.weights, sections=tuple(s.strip() for s in args.sections.split(",") if s.strip()))
    if args.quick:
        config.sizes, config.min_runs = (224,), 3
    unknown = set(config.sections) - {"encoder", "index"}
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from encoder,index")

    text = run(config, argv, log)
    return emit_section(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
