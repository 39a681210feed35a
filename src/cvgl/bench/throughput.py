"""Throughput benchmark: the encoder at every precision x runtime, the CPU's per-precision GEMM
peaks, descriptor fidelity, ``cvgl index`` end to end and one-photo ``cvgl locate``.

    python -m cvgl.bench.throughput [--out FILE] [--quick]

Everything is measured in one run, on this machine, side by side: the encoder variants (eager
torch fp32 = the reference, torch bf16, OpenVINO fp32/bf16 when the ``openvino`` extra is
installed) are timed **interleaved** (round-robin, one call of each per round) so that a load
change on a shared machine hits all of them alike; ratios are to eager fp32 at the same batch
and thread count. Times are medians (``--quick``: fewer rounds and tiles, for smoke tests only).
The load other processes put on the machine is reported per section.

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

**Per-precision peaks**: the CPU's matrix-relevant flags (AVX2, AVX-512, AVX512_BF16, AMX) and the
measured rate of a large square ``torch.matmul`` per dtype and thread count (the best this
machine's BLAS reaches); the **FLOP-bound limit** of an encoder variant is that peak / GFLOP per
image. A theoretical peak from clock x FMA units is not given: neither is in the flags.
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

from cvgl.bench.common import emit_section, log, markdown_table
from cvgl.models.encoder import PRECISION_DTYPES

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
    dtype: str
    threads: int
    shape: tuple[int, int, int, int]  # batch, m, k, n
    gflops: float
    seconds: float
    runs: int


DTYPES = PRECISION_DTYPES  # the encoder's precision names -> torch dtypes


def gemm_gflops(label: str, m: int, k: int, n: int, batch: int = 1, min_runs: int = 5,
                dtype: str = "fp32") -> GemmResult:
    """Median GFLOP/s of ``torch.matmul`` ``[batch,] m x k @ k x n`` in ``dtype`` (2 m k n FLOPs each)."""
    gen = torch.Generator().manual_seed(0)
    lead = (batch,) if batch > 1 else ()
    a = torch.randn(*lead, m, k, generator=gen).to(DTYPES[dtype])
    b = torch.randn(*lead, k, n, generator=gen).to(DTYPES[dtype])
    out = torch.empty(*lead, m, n, dtype=DTYPES[dtype])
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
    return GemmResult(label, dtype, torch.get_num_threads(), (batch, m, k, n), flops / seconds / 1e9, seconds, runs)


def deepest_block(encoder) -> int:
    return max(encoder._layers.values())


MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


# ----------------------------------------------------------------------------------------------
# Encoder variants: every precision x runtime, timed interleaved
# ----------------------------------------------------------------------------------------------

REFERENCE = "fp32 on torch"


def build_variants(weights: str, preset: str, log: Callable[[str], None]) -> tuple[dict, dict[str, str]]:
    """``{label: encoder}`` for every precision x runtime that can run here, and
    ``{label: why not}`` for those that cannot (OpenVINO not installed)."""
    from cvgl.models import runtime
    from cvgl.models.factory import create_encoder

    encoders, missing = {}, {}
    for name in ("torch", "openvino"):
        for precision in ("fp32", "bf16"):
            label = f"{precision} on {name}"
            if name == "openvino" and not runtime.openvino_available():
                missing[label] = "OpenVINO not installed (`pip install 'cvgl[openvino]'`)"
                continue
            log(f"building encoder {label}")
            encoders[label] = create_encoder(preset, weights, (224, 224), precision=precision, runtime=name)
    return encoders, missing


def interleaved_seconds(encoders: dict, batch: int, rounds: int, size: int = 224) -> dict[str, tuple[float, int]]:
    """Median seconds per ``forward`` of a ``[batch, 3, size, size]`` batch, per encoder, timed
    round-robin (one call of each per round; batch 1: 4 calls per round)."""
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    calls = 4 if batch == 1 else 1
    times: dict[str, list[float]] = {label: [] for label in encoders}
    with torch.inference_mode():
        for encoder in encoders.values():  # warm-up: allocations, OpenVINO's compile per thread count
            encoder(images)
            encoder(images)
        for _ in range(rounds):
            for label, encoder in encoders.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    encoder(images)
                times[label].append((time.perf_counter() - t0) / calls)
    return {label: (statistics.median(values), len(values) * calls) for label, values in times.items()}


@dataclass
class VariantTiming:
    label: str
    threads: int
    batch: int
    seconds: float
    runs: int

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


# ----------------------------------------------------------------------------------------------
# Fidelity on real tiles
# ----------------------------------------------------------------------------------------------


def real_tile_pairs(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` WV3 tiles (the reference; evenly spread over the scene) and WV2 crops centred on
    the same ground points (the queries, another sensor and date), as the ``longmont`` protocol A."""
    from cvgl.data.raster import read_region
    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles

    spec = TilingSpec(tile_m=112.0, stride_m=56.0, gsd_m=0.5)
    tiles = list(iter_tiles(longmont_scene("wv3"), spec))
    keep = np.unique(np.linspace(0, len(tiles) - 1, min(count, len(tiles))).round().astype(int))
    wv2 = longmont_scene("wv2")
    return ([tiles[i].image for i in keep],
            [read_region(wv2, tiles[i].x, tiles[i].y, spec.tile_m, spec.gsd_m) for i in keep])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fidelity_rows(encoders: dict, references: list[np.ndarray], queries: list[np.ndarray]) -> list[list[object]]:
    """Per variant: cosine to eager fp32 (mean/min over tiles + queries), top-1 agreement of its
    queries against the fp32 index and against its own index, and cross-sensor R@1 (the top-1 tile
    is the co-registered one)."""
    desc = {label: (_unit(e.encode(references)), _unit(e.encode(queries))) for label, e in encoders.items()}
    ref32, q32 = desc[REFERENCE]
    top32 = (q32 @ ref32.T).argmax(1)
    truth = np.arange(len(queries))
    rows = []
    for label, (ref, q) in desc.items():
        cos = np.concatenate([np.sum(ref * ref32, 1), np.sum(q * q32, 1)])
        vs_fp32_index = (q @ ref32.T).argmax(1)
        own = (q @ ref.T).argmax(1)
        rows.append([label, len(cos), f"{cos.mean():.6f}", f"{cos.min():.6f}",
                     f"{np.mean(vs_fp32_index == top32):.1%}", f"{np.mean(own == top32):.1%}",
                     f"{np.mean(own == truth):.3f}"])
    return rows


# ----------------------------------------------------------------------------------------------
# OpenMP wait policy (2 threads on a shared machine)
# ----------------------------------------------------------------------------------------------

_POLICY_SCRIPT = """
import json, statistics, sys, time, torch
torch.set_num_threads(2)
from cvgl.models.factory import create_encoder
encoder = create_encoder(sys.argv[1], sys.argv[2], (224, 224))
out = {}
with torch.inference_mode():
    for batch in (1, 16):
        images = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        encoder(images)
        times = []
        for _ in range(int(sys.argv[3])):
            t0 = time.perf_counter(); encoder(images); times.append(time.perf_counter() - t0)
        out[batch] = statistics.median(times)
print(json.dumps(out))
"""


def wait_policy_seconds(preset: str, weights: str, rounds: int) -> dict[str, dict[str, float]]:
    """fp32 seconds per batch (1 and 16) at 2 threads in a fresh process per ``OMP_WAIT_POLICY``
    (it is read once, when OpenMP starts, so it cannot be switched inside one process)."""
    import json
    import subprocess

    out = {}
    for policy in ("default", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        done = subprocess.run([sys.executable, "-c", _POLICY_SCRIPT, preset, weights, str(rounds)], env=env,
                              check=True, capture_output=True, text=True)
        out[policy] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------------------------
# End-to-end indexing of the Longmont raster
# ----------------------------------------------------------------------------------------------


@dataclass
class IndexRunResult:
    tiles: int
    read_s: float  # iter_tiles alone, median of 3 passes
    build_s: dict[str, float]  # build_index (read + encode + alignment + write), per variant
    load_s: float  # create_encoder with cached weights (fp32 on torch)
    cli_s: float | None  # the `cvgl index` command in a subprocess (Python start, imports, load, build)
    import_s: float  # a fresh Python process importing cvgl.cli (the CLI's start-up)


def index_run(out_dir: Path, encoders: dict, weights: str = "embedded", cli: bool = True) -> IndexRunResult:
    """Time indexing Longmont WV3 (112 m tiles, stride 56 m, 0.5 m GSD, default encoder) several
    ways; the fp32 index is left in ``out_dir / "index"`` for the locate section."""
    import subprocess

    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles
    from cvgl.index.build import build_index
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    spec = TilingSpec(tile_m=112.0, stride_m=56.0, gsd_m=0.5)
    path = longmont_scene("wv3")
    t0 = time.perf_counter()
    create_encoder(DEFAULT_PRESET, weights)
    load_s = time.perf_counter() - t0
    images: list[np.ndarray] = []

    def read() -> None:
        images.clear()
        images.extend(tile.image for tile in iter_tiles(path, spec))

    read_s, _ = median_seconds(read, min_runs=3, max_runs=3, budget_s=0.0, warmup=1)
    build_s = {}
    for label, encoder in encoders.items():
        name = "index" if label == REFERENCE else "index-" + label.replace(" ", "-")
        t0 = time.perf_counter()
        build_index(path, out_dir / name, encoder, spec, progress=False)
        build_s[label] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cvgl.cli"], check=True, capture_output=True)
    import_s = time.perf_counter() - t0
    cli_s = None
    if cli:
        command = [sys.executable, "-m", "cvgl", "index", str(path), "--out", str(out_dir / "cli-index"),
                   "--tile-m", "112", "--stride-m", "56", "--gsd", "0.5", "--weights", weights]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        cli_s = time.perf_counter() - t0
    return IndexRunResult(len(images), read_s, build_s, load_s, cli_s, import_s)


# ----------------------------------------------------------------------------------------------
# One-photo locate: a 12 MP JPEG, heading unknown
# ----------------------------------------------------------------------------------------------

PHOTO_HW = (3000, 4000)  # 12 MP


def make_large_photo(folder: Path, seed: int = 0) -> tuple[Path, tuple[float, float]]:
    """A 4000x3000 JPEG cut from WV2 (nadir, random yaw, no metadata: heading and altitude
    unknown) and the ground point at its centre (lat, lon)."""
    from PIL import Image

    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import QueryFamily, make_queries

    query = make_queries(longmont_scene("wv2"), 1, QueryFamily("nadir", heading_known=False), seed,
                         photo_size=PHOTO_HW)[0]
    path = folder / "photo-12mp.jpg"
    Image.fromarray(query.image).save(path, quality=92)
    return path, (query.center_lat, query.center_lon)


# Run in a fresh process, so imports and model load are what a one-photo command pays.
_STAGES_SCRIPT = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import numpy as np
import torch
from cvgl.data.images import load_photo
from cvgl.data.metadata import read_camera_metadata
from cvgl.index.search import hypothesis_scores
from cvgl.index.store import open_index
from cvgl.models.factory import create_encoder
from cvgl.preprocess import QueryOptions, hypothesis_side, prepare_image
stages = {"imports": time.perf_counter() - t0}
index_dir, photo, sized, precision, runtime, weights, out = sys.argv[1:8]
sized = sized == "1"
t0 = time.perf_counter()
index = open_index(Path(index_dir))
built = index.manifest.encoder
encoder = create_encoder(built.preset, weights, tuple(built.input_size), view="query", precision=precision, runtime=runtime)
stages["model load + index open"] = time.perf_counter() - t0
tile_m, gsd_m = index.manifest.tile_m, index.manifest.gsd_m
options = QueryOptions(model_size=encoder.input_size if sized else None)
t0 = time.perf_counter()
meta = read_camera_metadata(Path(photo))
min_side = None
if sized:
    from PIL import Image
    with Image.open(photo) as img:
        width, height = img.size
    min_side = hypothesis_side((height, width), options, meta, tile_m, gsd_m)
image = np.asarray(load_photo(Path(photo), min_side))
stages["decode"] = time.perf_counter() - t0
t0 = time.perf_counter()
query = prepare_image(image, meta, Path(photo), options, tile_m, gsd_m)
stages["hypotheses"] = time.perf_counter() - t0
t0 = time.perf_counter()
desc = encoder.encode([h.image for h in query.hypotheses])
stages["model"] = time.perf_counter() - t0
t0 = time.perf_counter()
scores, best = hypothesis_scores(index, desc, index.alignment)
stages["search"] = time.perf_counter() - t0
np.save(out, desc)
top = int(np.argmax(scores))
print(json.dumps({"stages": stages, "decoded": list(image.shape[:2]), "hypotheses": len(query.hypotheses),
                  "hypothesis_px": list(query.hypotheses[0].image.shape[:2]), "computed": encoder.describe(),
                  "top1": top, "top1_latlon": [float(index.tiles["lat"].iloc[top]), float(index.tiles["lon"].iloc[top])]}))
"""


@dataclass
class LocateRun:
    label: str
    wall_s: float  # the subprocess, Python start included
    stages: dict[str, float]
    info: dict
    desc: np.ndarray


def locate_stages(index_dir: Path, photo: Path, sized: bool, precision: str, runtime: str, weights: str,
                  label: str, tmp: Path) -> LocateRun:
    import json
    import subprocess

    out = tmp / f"desc-{len(label)}-{int(sized)}-{precision}-{runtime}.npy"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _STAGES_SCRIPT, str(index_dir), str(photo), "1" if sized else "0",
                           precision, runtime, weights, str(out)],
                          check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return LocateRun(label, wall, info.pop("stages"), info, np.load(out))


def cli_locate_seconds(index_dir: Path, photo: Path, weights: str, tmp: Path, extra: Sequence[str] = ()) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one ``cvgl locate`` process (GNU time's numbers when
    installed, else the wall clock here and the children's peak so far)."""
    import resource
    import subprocess

    command = [sys.executable, "-m", "cvgl", "locate", str(index_dir), str(photo), "--weights", weights,
               "--json", str(tmp / "answers.jsonl"), *extra]
    timer = Path("/usr/bin/time").is_file()
    stats = tmp / "time.txt"
    prefix = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats)] if timer else []
    t0 = time.perf_counter()
    done = subprocess.run(prefix + command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:200]
        raise RuntimeError(f"exit status {done.returncode}: {tail}")
    if timer:
        seconds, kb = stats.read_text().split()[-2:]
        return float(seconds), float(kb) / 1024
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


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

    from cvgl.models.runtime import cpu_name

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        (f"Machine: {platform.platform()} | CPU: {cpu_name()} | cores: {os.cpu_count()} logical, "
        f"{usable} usable | torch {torch.__version__} | faiss {faiss.__version__} | numpy {np.__version__} | "
        f"Python {platform.python_version()} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} | "
        f"load average at start: {load}"),
        "",
        "Command: `python -m cvgl.bench.throughput" + ("" if not argv else " " + shlex.join(argv)) + "`",
    ]


@dataclass
class Config:
    batches: tuple[int, ...] = (1, 16)
    threads: tuple[int, ...] = (1, 2)
    rounds: int = 5
    fidelity_tiles: int = 128
    min_runs: int = 5
    weights: str = "embedded"
    sections: tuple[str, ...] = ("encoder", "index", "locate")


def _ratio(x: float, reference: float) -> str:
    return f"{x / reference:.2f}x"


def run(config: Config, argv: Sequence[str], log: Callable[[str], None]) -> str:
    from cvgl.models import runtime
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    started = time.perf_counter()
    default_threads = torch.get_num_threads()
    lines = ["## Benchmark `throughput` (encoder precision x runtime, per-precision peaks, `cvgl index`, "
             "one-photo `cvgl locate`)", ""] + machine_header(argv) + [""]
    flags = runtime.cpu_flags()
    native = runtime.has_native_bf16()
    auto_precision = runtime.resolve_precision("auto")
    lines += [
        (f"CPU flags for matrix maths: {', '.join(f for f in MATRIX_FLAGS if f in flags) or 'none found'} "
         f"(absent: {', '.join(f for f in MATRIX_FLAGS if f not in flags) or 'none'}). Native bf16 matrix "
         f"instructions: **{'yes' if native else 'no'}** -> `--precision auto` picks **{auto_precision}** here"
         + ("" if native else " (bf16 would only be emulated: slower and less exact)") + "."),
        "",
    ]
    monitor = CpuMonitor()
    encoders: dict = {}
    missing: dict[str, str] = {}
    if {"encoder", "index"} & set(config.sections):
        encoders, missing = build_variants(config.weights, DEFAULT_PRESET, log)
    reference_rate: float | None = None
    if "encoder" in config.sections:
        # -- per-precision peaks -------------------------------------------------------------------
        log("GEMM peaks per precision")
        gemms: list[GemmResult] = []
        for threads in config.threads:
            torch.set_num_threads(threads)
            for dtype in DTYPES:
                gemms.append(gemm_gflops("square 1024^3", 1024, 1024, 1024, min_runs=config.min_runs, dtype=dtype))
                gemms.append(gemm_gflops("ViT-S MLP fc1, batch 16 (4112x384 @ 384x1536)", 16 * 257, 384, 1536,
                                         min_runs=config.min_runs, dtype=dtype))
        peak = {(g.dtype, g.threads): max(x.gflops for x in gemms if (x.dtype, x.threads) == (g.dtype, g.threads))
                for g in gemms}
        # -- encoder variants, interleaved -----------------------------------------------------------
        timings: list[VariantTiming] = []
        for threads in config.threads:
            torch.set_num_threads(threads)
            for batch in config.batches:
                log(f"encoder variants, {threads} thread(s), batch {batch}")
                for label, (seconds, runs) in interleaved_seconds(encoders, batch, config.rounds).items():
                    timings.append(VariantTiming(label, threads, batch, seconds, runs))
        torch.set_num_threads(default_threads)
        base = {(t.threads, t.batch): t for t in timings if t.label == REFERENCE}
        reference_rate = base.get((max(config.threads), 16), next(iter(base.values()))).images_per_s
        encoder = encoders[REFERENCE]
        blocks = deepest_block(encoder)
        gflop = backbone_flops(encoder.backbone, (224, 224), blocks)["total"] / 1e9
        rows = []
        for t in sorted(timings, key=lambda t: (t.threads, t.batch)):
            ref = base[(t.threads, t.batch)]
            dtype = t.label.split()[0]
            limit = peak[(dtype, t.threads)] / gflop
            rows.append([t.label, t.threads, t.batch, f"{t.images_per_s:.2f}", f"{t.seconds * 1e3:.1f}", t.runs,
                         f"**{_ratio(t.images_per_s, ref.images_per_s)}**", f"{t.images_per_s * gflop:.0f}",
                         f"{limit:.1f}", f"{t.images_per_s / limit:.0%}"])
        for label, why in missing.items():
            rows.append([label, "-", "-", "not run", "-", "-", "-", "-", "-", why])
        lines += [
            f"### 1. Encoder: every precision x runtime ({DEFAULT_PRESET}, 224 px, `Encoder.forward` on ready tensors)",
            "",
            (f"Timed interleaved ({config.rounds} rounds, one call of each variant per round; batch 1: 4 calls), "
             f"median; weights: {config.weights}; {gflop:.2f} GFLOP/image ({blocks} of "
             f"{encoder.backbone.depth} blocks). Ratio = images/s over eager fp32 at the same batch and threads. "
             "FLOP-bound limit = this precision's measured GEMM peak at that thread count (section 2) / GFLOP "
             "per image (a ratio above 100% means that runtime's kernels beat torch's own GEMM, which is "
             "then not this CPU's peak). bf16 = backbone in bfloat16, normalisation and GeM head in float32; OpenVINO = the same "
             "encoder exported once to ONNX, compiled for this CPU with that inference precision."),
            "",
        ]
        lines += markdown_table(["variant", "threads", "batch", "images/s", "ms/batch", "runs", "vs eager fp32",
                                 "achieved GFLOP/s", "FLOP-bound limit (images/s)", "measured / limit"], rows)
        lines += ["", f"While section 1 ran, {monitor.others()}.", ""]
        lines += ["### 2. Per-precision peaks of this CPU (measured `torch.matmul`, median)", ""]
        lines += markdown_table(
            ["GEMM", "dtype", "threads", "shape (batch, m, k, n)", "GFLOP/s", "vs fp32 (same shape, threads)",
             "ms each", "runs"],
            [[g.label, g.dtype, g.threads, "x".join(map(str, g.shape)), f"{g.gflops:.1f}",
              _ratio(g.gflops, next(x.gflops for x in gemms if (x.label, x.threads, x.dtype) == (g.label, g.threads, "fp32"))),
              f"{g.seconds * 1e3:.2f}", g.runs] for g in gemms],
        )
        lines += [
            "",
            ("No theoretical peak is printed: clock speed and the number of FMA / matrix units per core are not "
             "in the CPU flags (an EPYC's AVX-512 runs on 256-bit or 512-bit data paths depending on the "
             "generation), so only measured rates are claimed."),
            "",
            "FLOPs per image: analytic formula vs `torch.utils.flop_counter.FlopCounterMode`:",
            "",
        ]
        counted = counted_flops(encoder.backbone, (224, 224), blocks) / 1e9
        parts = backbone_flops(encoder.backbone, (224, 224), blocks)
        lines += markdown_table(
            ["encoder", "blocks", "input px", "tokens N", "patch embed GFLOP", "GFLOP/block", "attention share",
             "analytic GFLOP", "FlopCounterMode GFLOP", "difference"],
            [[DEFAULT_PRESET, f"{blocks}/{encoder.backbone.depth}", 224, parts["tokens"],
              f"{parts['patch_embed'] / 1e9:.3f}", f"{parts['per_block'] / 1e9:.3f}",
              f"{parts['attention'] / parts['per_block']:.0%}", f"{gflop:.3f}", f"{counted:.3f}",
              f"{(counted - gflop) / gflop:+.2%}"]],
        )
        # -- fidelity --------------------------------------------------------------------------------
        log("descriptor fidelity on real tiles")
        monitor.restart()
        references, queries = real_tile_pairs(config.fidelity_tiles)
        lines += [
            "",
            f"### 3. Descriptor fidelity on real tiles ({len(references)} WV3 tiles + the {len(queries)} "
            "co-registered WV2 tiles as queries)",
            "",
            ("Cosine of each variant's descriptor to eager fp32's for the same image; top-1 agreement = the "
             "share of queries whose best tile is the one eager fp32 finds, with the variant's queries against "
             "the fp32 index (mixed: the index identity does not include precision or runtime) and against an "
             "index built with the same variant; R@1 = the best tile is the co-registered one (cross-sensor)."),
            "",
        ]
        lines += markdown_table(["variant", "descriptors", "cosine mean", "cosine min",
                                 "top-1 = fp32's (vs fp32 index)", "top-1 = fp32's (own index)", "R@1"],
                                fidelity_rows(encoders, references, queries))
        lines += ["", f"While section 3 ran, {monitor.others()}.", ""]
        # -- auto choice + OpenMP wait policy ----------------------------------------------------------
        log("auto choice, OpenMP wait policy")
        monitor.restart()
        auto = create_encoder(DEFAULT_PRESET, config.weights, precision="auto", runtime="auto")
        record = {k: v for k, v in runtime.read_choices().items()}
        lines += ["### 4. What `auto` chooses here, and the OpenMP wait policy", ""]
        lines += [(f"`--precision auto --runtime auto` -> **{auto.describe()}** (precision from the CPU flags "
                   f"above; runtime: " + ("torch, OpenVINO not installed" if not runtime.openvino_available() else
                   f"measured once and recorded in `{runtime.CHOICE_FILE}` under the cvgl cache, then read on "
                   "every start") + ")."), ""]
        if record:
            lines += markdown_table(
                ["recorded for", "threads", "precision", "torch s/batch of 4", "OpenVINO s/batch of 4", "choice"],
                [[r.get("cpu", "?"), r.get("threads", "?"), r.get("precision", "?"),
                  f"{r['torch_s']:.3f}" if "torch_s" in r else "-", f"{r['openvino_s']:.3f}" if "openvino_s" in r else "-",
                  r.get("runtime", "?") + (f" ({r['reason']})" if "reason" in r else "")]
                 for r in record.values() if isinstance(r, dict)])
            lines += [""]
        policy = wait_policy_seconds(DEFAULT_PRESET, config.weights, max(3, config.rounds // 2))
        lines += [("fp32 eager, 2 threads, fresh process per policy (median s/batch): "
                   + "; ".join(f"`OMP_WAIT_POLICY={name}`: batch 1 {v['1']:.3f} s, batch 16 {v['16']:.3f} s"
                               for name, v in policy.items())
                   + f". While this ran, {monitor.others()}."), ""]
        del auto

    with tempfile.TemporaryDirectory(prefix="cvgl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # -- cvgl index end to end ---------------------------------------------------------------------
        if "index" in config.sections or "locate" in config.sections:
            log("cvgl index on Longmont WV3")
            monitor.restart()
            index_encoders = {k: v for k, v in encoders.items() if k in (REFERENCE, f"{auto_precision} on torch")}
            res = index_run(tmp, index_encoders or {REFERENCE: create_encoder(DEFAULT_PRESET, config.weights)},
                            config.weights, cli="index" in config.sections)
        if "index" in config.sections:
            if reference_rate is None:
                reference_rate = 16 / median_seconds(lambda: encoders[REFERENCE](torch.rand(16, 3, 224, 224)), 3)[0]
            rows = [["read tiles only (`iter_tiles`, median of 3 passes)", "-", res.tiles, f"{res.read_s:.2f}",
                     f"{res.tiles / res.read_s:.1f}", "-"]]
            for label in res.build_s:
                rows.append(["`build_index` (read + encode + alignment + write to a temp dir)", label, res.tiles,
                             f"{res.build_s[label]:.2f}", f"{res.tiles / res.build_s[label]:.2f}",
                             _ratio(res.build_s[REFERENCE], res.build_s[label])])
            if res.cli_s is not None:
                rows.append(["`cvgl index` command as it is today (subprocess: start, imports, model load, build)",
                             REFERENCE, res.tiles, f"{res.cli_s:.2f}", f"{res.tiles / res.cli_s:.2f}",
                             _ratio(res.build_s[REFERENCE], res.cli_s)])
            rows.append([f"pure encoder `forward`, batch 16, {max(config.threads)} threads (section 1)", REFERENCE,
                         "-", "-", f"{reference_rate:.2f}", "-"])
            lines += [
                "### 5. `cvgl index` end to end (Longmont WV3, 112 m tiles, stride 56 m, 0.5 m GSD, default encoder)",
                "",
            ]
            lines += markdown_table(["stage", "computed as", "tiles", "seconds", "tiles/s", "speed vs fp32 on torch"],
                                    rows)
            lines += [
                "",
                (f"Threads: torch's default ({default_threads}). Start-up: a fresh Python importing `cvgl.cli` "
                 f"{res.import_s:.2f} s; model load in-process (`create_encoder`, weights already converted and "
                 f"cached) {res.load_s:.2f} s. While section 5 ran, {monitor.others()}."),
                "",
            ]
        # -- one-photo locate ------------------------------------------------------------------------
        if "locate" in config.sections:
            log("one-photo locate (12 MP JPEG, heading unknown)")
            monitor.restart()
            photo, (lat, lon) = make_large_photo(tmp)
            index_dir = tmp / "index"
            runs = [
                locate_stages(index_dir, photo, False, "fp32", "torch", config.weights,
                              "full decode, full-size hypotheses, fp32 on torch (the path before sized preprocessing)", tmp),
                locate_stages(index_dir, photo, True, "fp32", "torch", config.weights,
                              "sized: draft decode + hypotheses at model size, fp32 on torch", tmp),
                locate_stages(index_dir, photo, True, "auto", "torch", config.weights,
                              "sized + `--precision auto` (what `cvgl locate` runs by default)", tmp),
                locate_stages(index_dir, photo, True, "auto", "auto", config.weights,
                              "sized + `--precision auto --runtime auto`", tmp),
            ]
            cli: dict[str, tuple[float, float] | str] = {}
            for label, extra in (("`--refine off` (retrieval only)", ["--refine", "off"]),
                                 ("default (`--refine auto`: verification of the top 10)", []),
                                 ("`--refine off --runtime auto`", ["--refine", "off", "--runtime", "auto"])):
                try:
                    cli[label] = cli_locate_seconds(index_dir, photo, config.weights, tmp, extra)
                except Exception as exc:  # noqa: BLE001 - reported in the section, not fatal to the benchmark
                    cli[label] = " ".join(str(exc).split())[:200]
            names = list(runs[0].stages)
            rows = []
            for r in runs:
                total = sum(r.stages.values())
                cos = np.sum(_unit(r.desc) * _unit(runs[0].desc), 1)
                rows.append([r.label, r.info["computed"], *[f"{r.stages[n]:.2f}" for n in names], f"{total:.2f}",
                             f"{r.wall_s:.2f}", "x".join(map(str, r.info["decoded"])),
                             f"{r.info['hypotheses']} x {'x'.join(map(str, r.info['hypothesis_px']))}",
                             f"{cos.mean():.5f} / {cos.min():.5f}",
                             "same" if r.info["top1"] == runs[0].info["top1"] else "DIFFERENT"])
            from cvgl.geo import geodesic_distance_m

            error_m = geodesic_distance_m(lat, lon, *runs[-1].info["top1_latlon"])
            lines += [
                f"### 6. One-photo `cvgl locate`: a 12 MP JPEG ({PHOTO_HW[1]}x{PHOTO_HW[0]}), heading unknown "
                "(16 rotations), altitude unknown",
                "",
                ("Each row is a fresh process (what a one-photo command pays), stage by stage, seconds; "
                 "'process wall' includes Python's own start. Cosine = each hypothesis descriptor against the "
                 "first row's (same heading), mean / min; top-1 = the best tile compared with the first row's."),
                "",
            ]
            lines += markdown_table(["path", "computed as", *names, "sum of stages", "process wall", "decoded px",
                                     "hypotheses", "cosine to full decode", "top-1"], rows)
            lines += ["", "The `cvgl locate INDEX photo.jpg --json FILE` command itself (a fresh process each):", ""]
            lines += markdown_table(
                ["command", "wall s", "peak resident MB"],
                [[label, f"{v[0]:.2f}", f"{v[1]:.0f}"] if isinstance(v, tuple) else [label, f"failed: {v}", "-"]
                 for label, v in cli.items()])
            lines += [
                "",
                (f"The top-1 tile of the last row is {error_m:.0f} m from the photo's true centre. "
                 f"While section 6 ran, {monitor.others()}."),
                "",
            ]

    lines += [f"Total run time: {time.perf_counter() - started:.0f} s; load average at the end: "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ".", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cvgl.bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here (atomically)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, 32 fidelity tiles")
    parser.add_argument("--sections", default="encoder,index,locate", help="subset of encoder,index,locate")
    parser.add_argument("--weights", default="embedded", help="encoder weights (embedded | PATH | random:<arch>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = Config(weights=args.weights, sections=tuple(s.strip() for s in args.sections.split(",") if s.strip()))
    if args.quick:
        config.rounds, config.min_runs, config.fidelity_tiles = 3, 3, 32
    unknown = set(config.sections) - {"encoder", "index", "locate"}
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from encoder,index,locate")

    text = run(config, argv, log)
    return emit_section(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
