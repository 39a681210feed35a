"""How an encoder computes: numeric precision (``fp32 | bf16``) and runtime (``torch | openvino``).

Neither changes what a descriptor *is*: :class:`~cvgl.models.identity.EncoderIdentity` leaves
both out, so an index built in bf16 answers fp32 queries and the other way round
(``cvgl bench throughput`` measures the descriptor cosine and top-1 agreement that make this
safe). The precision and runtime an index was built with are information for its reader
(:meth:`~cvgl.models.encoder.Encoder.describe`), never compared when a query is checked.

**Precision.** ``bf16`` casts the ViT backbone to bfloat16; image normalisation and the pooling
head stay float32 (GeM's cube and the L2 norms are where bf16's 8-bit mantissa would hurt).
``auto`` picks bf16 where the hardware multiplies bf16 matrices natively — a CPU with AMX-BF16 or
AVX512_BF16 (:func:`has_native_bf16`, from the CPU's flags), or a CUDA GPU that supports bf16 —
and fp32 everywhere else, where bf16 would only be emulated (slower, and less exact).

**Runtime.** ``torch`` is eager PyTorch (the reference). ``openvino`` runs the same normalisation
and backbone (float32 graph, its outputs the tokens of the head's layers) exported once per encoder
identity to ONNX with ``torch.onnx`` and cached under :func:`cvgl.models.weights.cache_dir` like the
converted weights (``onnx/<key>/encoder.onnx``); OpenVINO compiles it for this CPU at the requested
precision (``INFERENCE_PRECISION_HINT``), and keeps its compiled blobs in ``openvino/``, so only the
first start pays the compile. The head runs in torch float32 on OpenVINO's tokens, as it does after a
bf16 torch backbone: OpenVINO's bf16 hint applies to the whole graph it is given, and a bf16 GeM
(cube, mean, cube root) collapsed the tiny test encoder's descriptors to a constant vector on CI's
bf16-capable CPU. The export is checked against torch on a fixed input before first use.
OpenVINO is an optional extra (``pip install 'cvgl[openvino]'``): asking for it without it installed
is a one-line :class:`RuntimeUnavailableError`.

``auto`` runtime is deterministic: torch unless OpenVINO is installed *and* was measured faster on
this machine. The measurement (:func:`measure_runtimes`) runs once per CPU model, library versions,
encoder shape (architecture, input size, head), precision, thread count and ``OMP_WAIT_POLICY``: both runtimes encode
the same fixed batch of :data:`CHECK_BATCH` images, interleaved, :data:`CHECK_ROUNDS` times;
OpenVINO is chosen when its median is at least :data:`CHECK_MARGIN` faster. The result is recorded
in ``runtime-choice.json`` in the cache and read on every later start, so one machine keeps making
the same choice (delete the file, or pass ``--runtime``, to change it). The record keeps the two
timings: a measurement taken while the machine was busy is visible, not silently trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cvgl.errors import CvglError
from cvgl.io import write_json_atomic
from cvgl.models.backbone import LayerTokens
from cvgl.models.encoder import Encoder
from cvgl.models.weights import cache_dir

PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "torch", "openvino")
#: CPU flags (Linux ``/proc/cpuinfo`` names) of native bf16 matrix multiply units.
BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}
#: Bump when the exported graph changes, so stale ONNX files in the cache are not reused.
EXPORT_VERSION = 2  # 2: the graph ends at the backbone's tokens; the head runs in torch
EXPORT_TOLERANCE = 1e-4  # max |descriptor difference| between the ONNX graph (OpenVINO f32) and torch
CHECK_BATCH = 4
CHECK_ROUNDS = 3
CHECK_MARGIN = 0.10
CHOICE_FILE = "runtime-choice.json"
INSTALL_HINT = "pip install 'cvgl[openvino]' (openvino and onnxscript), or use --runtime torch"


class RuntimeUnavailableError(CvglError):
    """A requested runtime or precision cannot run here (not installed, or not on this device)."""


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``/proc/cpuinfo``; empty where there is
    none: then :func:`has_native_bf16` asks torch instead)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512_BF16).

    ``flags`` (for tests): a flag set as :func:`cpu_flags` returns. Without ``/proc/cpuinfo``,
    torch's own CPU probe answers."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return any(flag in flags for flag in BF16_MATRIX_FLAGS)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> str:
    """``auto`` -> ``bf16`` on native bf16 hardware (see module doc), else ``fp32``; others as given."""
    if precision not in PRECISIONS:
        raise RuntimeUnavailableError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if has_native_bf16(flags) else "fp32"


# ----------------------------------------------------------------------------------------------
# OpenVINO: export once per identity, compile per thread count
# ----------------------------------------------------------------------------------------------


def openvino_available() -> bool:
    """OpenVINO and the ONNX exporter's onnxscript are importable (the ``openvino`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnxscript"))


def export_key(encoder: Encoder) -> str:
    """What the exported graph depends on: the encoder identity's compared fields (weights
    included: the ONNX file holds them), the input size and view actually encoded (a trained
    model's query and reference views share one identity but not always a size or a head), and
    :data:`EXPORT_VERSION`."""
    identity = encoder.identity.to_dict() if encoder.identity is not None else {}
    identity.pop("preset", None)  # a name, not part of what the encoder computes
    text = json.dumps({"identity": identity, "input_size": list(encoder.input_size),
                       "view": str(getattr(encoder.head, "view", "")), "export": EXPORT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class _TokensForward(torch.nn.Module):
    """Normalisation + backbone (eager float32) as a module for ``torch.onnx.export``: the tokens
    of the head's layers, flattened to ``(cls, patches)`` per layer in the head's order."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return flatten_tokens(self.encoder.tokens(images))


def flatten_tokens(tokens: dict[int, LayerTokens]) -> tuple[torch.Tensor, ...]:
    return tuple(t for layer in tokens.values() for t in (layer.cls, layer.patches))


def unflatten_tokens(specs: Sequence[int], outputs: Sequence[torch.Tensor]) -> dict[int, LayerTokens]:
    """The inverse of :func:`flatten_tokens` for the head's layer ``specs``."""
    if len(outputs) != 2 * len(specs):
        raise ValueError(f"{len(outputs)} exported outputs for {len(specs)} layers")
    return {spec: LayerTokens(outputs[2 * i], outputs[2 * i + 1]) for i, spec in enumerate(specs)}


def check_input(encoder: Encoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random batch at the encoder's input size (export check, runtime timing)."""
    return torch.rand(batch, 3, *encoder.input_size, generator=torch.Generator().manual_seed(seed))


def export_onnx(encoder: Encoder, path: Path) -> Path:
    """Export ``encoder`` (float32, on the CPU) to ONNX at ``path`` with a dynamic batch axis.

    torch.onnx prints its progress; it goes to stderr here, because ``cvgl locate`` writes
    answers on stdout."""
    if next(encoder.backbone.parameters()).dtype != torch.float32:
        raise ValueError("export the float32 encoder (before casting it to bf16)")
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(sys.stderr), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            _TokensForward(encoder).eval(), (check_input(encoder),), None, dynamo=True, verbose=False,
            input_names=["images"], dynamic_shapes={"images": {0: batch}},
        )
        program.save(str(path))
    return path


class OpenVinoRunner:
    """An exported encoder compiled by OpenVINO for this CPU: float32 ``[B, 3, H, W]`` -> ``[B, D]``.

    OpenVINO computes the tokens (at ``precision``); ``encoder``'s head pools them in torch
    float32. Compiled once per torch thread count (``torch.set_num_threads`` governs both
    runtimes), with OpenVINO's model cache, so a later process loads the compiled blob instead of
    compiling. One call at a time (an infer request is not re-entrant)."""

    def __init__(self, onnx_path: Path, precision: str, encoder: Encoder) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailableError(f"runtime 'openvino': not installed; {INSTALL_HINT}") from None
        self.precision = precision
        self.head = encoder.head
        self.specs = list(encoder.head.layers)
        self.version = ov.__version__
        self._core = ov.Core()
        self._core.set_property({"CACHE_DIR": str(cache_dir() / "openvino")})
        self._model = self._core.read_model(str(onnx_path))
        self._requests: dict[int, object] = {}
        self._lock = threading.Lock()

    def _request(self, threads: int):
        if threads not in self._requests:
            compiled = self._core.compile_model(self._model, "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[self.precision],
                "INFERENCE_NUM_THREADS": int(threads),
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                # A shared machine: pinning our threads to cores others are busy on only hurts.
                "ENABLE_CPU_PINNING": False,
            })
            self._requests[threads] = compiled.create_infer_request()
        return self._requests[threads]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            request = self._request(torch.get_num_threads())
            result = request.infer({0: array})
            outputs = [torch.from_numpy(np.array(result[i], dtype=np.float32, copy=True)) for i in range(len(result))]
        return self.head(unflatten_tokens(self.specs, outputs))


def onnx_path(encoder: Encoder) -> Path:
    return cache_dir() / "onnx" / export_key(encoder) / "encoder.onnx"


def cached_onnx(encoder: Encoder, log: Callable[[str], None] | None = None) -> Path:
    """The encoder's ONNX export from the cache, exported and checked on first use.

    The export goes to a temporary folder beside the cache entry, is compared with torch
    (OpenVINO f32 against eager float32, within :data:`EXPORT_TOLERANCE`), then renamed into
    place: a half-written or wrong export is never picked up by a later start."""
    path = onnx_path(encoder)
    if path.is_file():
        return path
    say = log or _stderr
    say(f"cvgl: exporting the encoder to ONNX for OpenVINO once (cached in {path.parent})")
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.parent.name}.", dir=path.parent.parent))
    try:
        exported = export_onnx(encoder, tmp / path.name)
        difference = export_difference(encoder, exported)
        if not difference <= EXPORT_TOLERANCE:
            raise RuntimeUnavailableError(
                f"runtime 'openvino': the exported encoder differs from torch by {difference:.2g} "
                f"(tolerance {EXPORT_TOLERANCE:g}); use --runtime torch"
            )
        try:
            tmp.rename(path.parent)
        except OSError:  # another process finished the same export first
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_difference(encoder: Encoder, exported: Path) -> float:
    """Largest |descriptor difference| between OpenVINO (f32) on ``exported`` and eager torch."""
    images = check_input(encoder, batch=3, seed=1)
    with torch.inference_mode():
        reference = encoder.torch_forward(images).float()
        got = OpenVinoRunner(exported, "fp32", encoder)(images)
    return float((got - reference).abs().max())


# ----------------------------------------------------------------------------------------------
# Choosing, and configuring an encoder
# ----------------------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name":
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def choice_key(encoder: Encoder, precision: str, threads: int, openvino_version: str) -> str:
    """What the speed comparison depends on: the CPU, library versions, the encoder's shape
    (architecture, input size, head; not its weights), precision, threads and the OpenMP wait
    policy (torch's multi-thread speed on a shared machine depends on it; OpenVINO's does not)."""
    identity = encoder.identity.to_dict() if encoder.identity is not None else {}
    shape = {k: identity.get(k) for k in ("arch", "head")}
    text = json.dumps({
        "cpu": cpu_name(), "flags": sorted(cpu_flags() & set(BF16_MATRIX_FLAGS + ("avx512f", "avx2", "amx_tile"))),
        "torch": torch.__version__, "openvino": openvino_version, "shape": shape,
        "input_size": list(encoder.input_size), "precision": precision, "threads": int(threads),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").upper(),
    }, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_choices() -> dict:
    try:
        data = json.loads((cache_dir() / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_choice(key: str) -> str | None:
    record = read_choices().get(key)
    runtime = record.get("runtime") if isinstance(record, dict) else None
    return runtime if runtime in ("torch", "openvino") else None


def record_choice(key: str, record: dict) -> None:
    choices = read_choices()
    choices[key] = record
    write_json_atomic(cache_dir() / CHOICE_FILE, choices)


def measure_runtimes(encoder: Encoder, runner: OpenVinoRunner, rounds: int = CHECK_ROUNDS) -> dict[str, float]:
    """Median seconds of torch and OpenVINO on the same :data:`CHECK_BATCH` images, interleaved."""
    images = check_input(encoder, batch=CHECK_BATCH, seed=2)
    times: dict[str, list[float]] = {"torch": [], "openvino": []}
    runs = {"torch": lambda: encoder.torch_forward(images), "openvino": lambda: runner(images)}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up: first-call allocations, OpenVINO's first inference
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def decide(timings: dict[str, float], margin: float = CHECK_MARGIN) -> str:
    """``openvino`` when its median time is at least ``margin`` below torch's, else ``torch``."""
    return "openvino" if timings["openvino"] < (1.0 - margin) * timings["torch"] else "torch"


def check_request(precision: str, runtime: str, device: str | torch.device = "cpu") -> None:
    """Refuse an unknown name, or a runtime that cannot run here, before any weights load."""
    if precision not in PRECISIONS:
        raise RuntimeUnavailableError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(f"runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if runtime == "openvino" and torch.device(device).type != "cpu":
        raise RuntimeUnavailableError(f"runtime 'openvino' runs on the CPU, not on {device}; use --runtime torch")
    if runtime == "openvino" and not openvino_available():
        raise RuntimeUnavailableError(f"runtime 'openvino': not installed; {INSTALL_HINT}")


def configure(encoder: Encoder, precision: str = "fp32", runtime: str = "torch", device: str | torch.device = "cpu",
              log: Callable[[str], None] | None = None) -> Encoder:
    """Set ``encoder``'s precision and runtime (``auto`` resolved as the module doc says), in place.

    ``encoder`` must be the freshly built float32 encoder: the OpenVINO export is taken from it
    before the backbone is cast."""
    say = log or _stderr
    check_request(precision, runtime, device)
    resolved = resolve_precision(precision, device)
    on_cpu = torch.device(device).type == "cpu"
    runner, chosen = None, None
    if runtime == "openvino" or (runtime == "auto" and on_cpu and openvino_available()):
        runner, chosen = _openvino_choice(encoder, resolved, runtime, say)
    encoder.to(device)
    encoder.set_precision(resolved)
    if runner is not None and runtime == "auto" and chosen is None:  # measure once, record
        import openvino as ov

        threads = torch.get_num_threads()
        say(f"cvgl: timing torch against OpenVINO once for this CPU and encoder ({resolved}, {threads} threads)")
        timings = measure_runtimes(encoder, runner)
        chosen = decide(timings)
        record_choice(choice_key(encoder, resolved, threads, ov.__version__), {
            "runtime": chosen, "torch_s": timings["torch"], "openvino_s": timings["openvino"],
            "batch": CHECK_BATCH, "cpu": cpu_name(), "precision": resolved, "threads": threads,
            "torch_version": torch.__version__, "openvino_version": ov.__version__, "measured_unix": int(time.time()),
        })
    if runner is not None and (runtime == "openvino" or chosen == "openvino"):
        encoder.set_runner(runner, "openvino")
    return encoder


def _openvino_choice(encoder: Encoder, precision: str, runtime: str, say: Callable[[str], None]):
    """(runner or None, recorded choice or None) for an explicit or ``auto`` OpenVINO request."""
    import openvino as ov

    chosen = None
    key = choice_key(encoder, precision, torch.get_num_threads(), ov.__version__)
    if runtime == "auto":
        chosen = recorded_choice(key)
        if chosen == "torch":
            return None, chosen
    try:
        return OpenVinoRunner(cached_onnx(encoder, say), precision, encoder), chosen
    except Exception as exc:  # noqa: BLE001 - an encoder torch.onnx cannot export runs on torch
        detail = " ".join(str(exc).split())[:160]
        if runtime == "openvino":
            if isinstance(exc, RuntimeUnavailableError):
                raise
            raise RuntimeUnavailableError(f"runtime 'openvino': exporting this encoder failed ({type(exc).__name__}: {detail}); "
                                          "use --runtime torch") from None
        say(f"cvgl: OpenVINO cannot run this encoder ({type(exc).__name__}); using torch")
        record_choice(key, {"runtime": "torch", "reason": f"{type(exc).__name__}: {detail}", "cpu": cpu_name(),
                            "measured_unix": int(time.time())})
        return None, "torch"
