"""``cvgl bench service``: requests/s and p50/p99 latency of ``cvgl serve`` under a bounded load.

Set-up: the Longmont WV3 scene indexed with the embedded weights (112 m tiles, 56 m stride,
0.5 m), ``cvgl serve`` started in a subprocess on a free loopback port, and one real 224-px nadir
drone photo simulated from WV2 (JPEG with EXIF GPS + DJI XMP heading, as a drone writes it).
``--concurrency`` client threads each keep one HTTP connection and send the same photo until
``--requests`` uploads are answered; nothing leaves 127.0.0.1. Side by side: the same photo through
``locate_images`` in this process (no HTTP, no upload, no JSON), with the server stopped so the
two never share the CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvgl.bench.common import emit_section, log, machine_line

TILING = (112.0, 56.0, 0.5)  # tile_m, stride_m, gsd_m
PHOTO_PX = 224
WARMUP = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart_body(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one file field, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: dict) -> bytes:
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status}: {payload[:200]!r}")
    return payload


def load(port: int, method: str, path: str, body: bytes | None, headers: dict, total: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``total`` requests from ``concurrency`` threads; (wall seconds, per-request seconds)."""
    latencies: list[float] = []
    remaining = [total]
    guard = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while True:
                with guard:
                    if remaining[0] <= 0 or errors:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                _request(conn, method, path, body, headers)
                with guard:
                    latencies.append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - reported after the threads join
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"load on {path} failed: {errors[0]}")
    return wall, latencies


def _wait_healthy(port: int, server: subprocess.Popen, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"cvgl serve exited with {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                return json.loads(_request(conn, "GET", "/health", None, {}))
            finally:
                conn.close()
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"cvgl serve did not answer /health within {timeout_s:.0f} s")


def _row(name: str, wall: float, latencies: list[float], concurrency: int, load_1min: float) -> str:
    ms = np.asarray(latencies) * 1000.0
    # nearest-rank percentiles: with 50 requests p99 is the slowest but one, not an interpolation
    p50, p99 = (float(np.percentile(ms, q, method="inverted_cdf")) for q in (50, 99))
    return f"| {name} | {len(ms)} | {concurrency} | {len(ms) / wall:.2f} | {p50:.1f} | {p99:.1f} | {ms.mean():.1f} | {load_1min:.1f} |"


def run(requests: int, concurrency: int, in_process_runs: int, weights: str, threads: int, argv: Sequence[str], log) -> str:
    import torch

    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
    from cvgl.data.tiling import TilingSpec
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="cvgl-bench-service-") as tmp:
        folder = Path(tmp)
        encoder = create_encoder(DEFAULT_PRESET, weights=weights)
        started = time.perf_counter()
        index_dir = build_index(longmont_scene("wv3"), folder / "index", encoder, TilingSpec(*TILING), progress=False)
        build_s = time.perf_counter() - started
        n_tiles = open_index(index_dir).manifest.count
        log(f"indexed {n_tiles} tiles in {build_s:.0f} s")
        family = QueryFamily("nadir", pitches=(0.0,), heading_known=True)
        query = make_queries(longmont_scene("wv2"), 1, family, seed=0, photo_size=(PHOTO_PX, PHOTO_PX))[0]
        photo = write_query_photo(query, folder)
        body, content_type = multipart_body("image", photo.name, photo.read_bytes())
        upload = {"Content-Type": content_type, "Content-Length": str(len(body))}

        port = _free_port()
        command = [sys.executable, "-m", "cvgl", "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port),
                   "--threads", str(threads)]
        if weights != "embedded":
            command += ["--weights", weights]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            started = time.perf_counter()
            _wait_healthy(port, server)
            startup_s = time.perf_counter() - started
            log(f"server up in {startup_s:.1f} s; warming up")
            load(port, "POST", "/locate", body, upload, WARMUP, 1)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                answer = json.loads(_request(conn, "POST", "/locate", body, upload))
            finally:
                conn.close()
            log(f"{requests} uploads from {concurrency} clients")
            loads = {"locate": os.getloadavg()[0]}
            locate_wall, locate_lat = load(port, "POST", "/locate", body, upload, requests, concurrency)
            health_n = max(4 * requests, 100)
            loads["health"] = os.getloadavg()[0]
            health_wall, health_lat = load(port, "GET", "/health", None, {}, health_n, concurrency)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

        log(f"in-process locate_images x {in_process_runs}")
        index = open_index(index_dir, encoder.identity)
        options = LocateOptions()
        loads["in-process"] = os.getloadavg()[0]
        (answered,), _, _ = locate_images([photo], encoder, index, options, progress=False)
        direct = answered.to_dict()
        in_process: list[float] = []
        for _ in range(in_process_runs):
            started = time.perf_counter()
            locate_images([photo], encoder, index, options, progress=False)
            in_process.append(time.perf_counter() - started)
        direct["query"] = photo.name
        same = json.loads(json.dumps(direct)) == answer
        error_m = answer.get("error_m")

    lines = [
        "## Benchmark `service` (`cvgl serve` on loopback: requests/s, p50/p99 latency)",
        "",
        f"Machine: {machine_line()}; load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "",
        f"Command: `python -m cvgl.bench.service {' '.join(argv)}`",
        "",
        f"Index: Longmont WV3, {n_tiles} tiles of {TILING[0]:g} m every {TILING[1]:g} m at {TILING[2]:g} m/px,",
        f"encoder {DEFAULT_PRESET}, weights {weights} (built in {build_s:.0f} s; server ready {startup_s:.1f} s after start).",
        f"Query: one simulated {PHOTO_PX}x{PHOTO_PX} nadir drone JPEG from WV2 with EXIF GPS and DJI XMP heading",
        f"({len(body) / 1024:.0f} kB multipart upload); {WARMUP} warm-up uploads first. Its answer is",
        f"{error_m:.0f} m from the truth and {'equals' if same else 'DIFFERS from'} `locate_images`' JSON for the same photo.",
        "",
        "| path | requests | concurrent clients | requests/s | p50 ms | p99 ms | mean ms | load avg (1 min) at start |",
        "|---|---|---|---|---|---|---|---|",
        _row("HTTP `POST /locate` (upload, decode, encode 1 view, score, JSON)", locate_wall, locate_lat, concurrency, loads["locate"]),
        _row("in-process `locate_images` (same photo, no HTTP)", sum(in_process), in_process, 1, loads["in-process"]),
        _row("HTTP `GET /health` (server overhead alone)", health_wall, health_lat, concurrency, loads["health"]),
        "",
        f"Torch runs {threads} thread(s) in each process (`--threads`; both paths alike): on this shared box, 2-thread",
        "OpenMP under neighbours' load measured 10-20x slower per forward than 1 thread (0.11 s vs ~2 s for one drone photo),",
        "which would time the neighbours rather than the service. Inference runs under one lock in the server's threadpool,",
        "so with 2 clients one upload waits while the other is encoded: requests/s is bounded by",
        "1 / (time inside `locate_images`) while one upload's HTTP work overlaps the other's inference, and each",
        "upload's latency is about twice its service time; the two rows' load differs, so a few % either way is noise.",
        "Percentiles are nearest-rank over the timed requests (client-side wall time, connection kept alive).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cvgl.bench.service", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="timed uploads")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads, each with one connection")
    parser.add_argument("--in-process-runs", type=int, default=10)
    parser.add_argument("--weights", default="embedded")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in the server and in-process alike")
    parser.add_argument("--quick", action="store_true", help="10 uploads, 3 in-process runs")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.in_process_runs = 10, 3
    if min(args.requests, args.concurrency, args.in_process_runs, args.threads) < 1:
        parser.error("--requests, --concurrency, --in-process-runs and --threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    text = run(args.requests, args.concurrency, args.in_process_runs, args.weights, args.threads, argv, log)
    return emit_section(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
