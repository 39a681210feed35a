"""``cvgl index --ray`` on a local 2-CPU Ray instance: the same index as in process, clear errors.

One Ray instance serves the whole module (start-up costs seconds); each build starts its own
actor pool. Models are the tiny random ViT except in the ``real`` test.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from hypothesis import given
from hypothesis import strategies as st

from cvgl.cli import main
from cvgl.data.samples import longmont_scene
from cvgl.data.tiling import TilingSpec
from cvgl.index.build import build_index
from cvgl.index.ray_embed import (
    READER_CPU_RESERVE,
    READER_CPUS,
    DistributedError,
    RayOptions,
    actor_cpus,
    ray_session,
)
from cvgl.index.shards import shard_folder
from cvgl.index.store import open_index
from cvgl.models.factory import EncoderRecipe

TINY = ["--weights", "random:dinov2_tiny_test", "--input-size", "56"]
LONGMONT_TINY = TilingSpec(tile_m=112, stride_m=112, gsd_m=2.0)  # 8 x 8 tiles of 56 px


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU Ray instance for this module (skipped where Ray is not installed)."""
    pytest.importorskip("ray.data")
    with ray_session("auto") as startup_s:
        yield startup_s


def error_lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.strip() and "tile/s" not in line and "it/s" not in line]


def assert_same_index(a: Path, b: Path) -> None:
    """Bitwise: same tile table, raw vectors, aligned vectors and manifest (but its time stamp)."""
    first, second = open_index(a), open_index(b)
    pd.testing.assert_frame_equal(first.tiles, second.tiles)
    np.testing.assert_array_equal(first.raw, second.raw)
    np.testing.assert_array_equal(first.reference, second.reference)
    drop = {"created_unix"}
    assert {k: v for k, v in first.manifest.to_dict().items() if k not in drop} == {
        k: v for k, v in second.manifest.to_dict().items() if k not in drop
    }


def test_ray_cli_equals_in_process_on_longmont(local_ray, tmp_path: Path, tiny_encoder, capsys) -> None:
    source = longmont_scene("wv3")
    torch.set_num_threads(1)  # the actors run one thread each; same kernels -> bitwise equal
    expected = build_index(source, tmp_path / "local", tiny_encoder("gem"), LONGMONT_TINY, progress=False, shard_size=16)

    torch.manual_seed(0)  # the same random weights as tiny_encoder("gem"), drawn in the CLI
    argv = ["index", source, "--out", tmp_path / "ray", "--encoder", "gem", *TINY, "--tile-m", "112",
            "--stride-m", "112", "--gsd", "2.0", "--shard-size", "16", "--ray", "auto", "--workers", "2",
            "--precision", "fp32"]  # the in-process build above is fp32: same arithmetic -> bitwise equal
    started = time.perf_counter()
    assert main([str(a) for a in argv]) == 0
    print(f"ray build of 64 tiles: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    assert f"-> {tmp_path / 'ray'}" in capsys.readouterr().out
    assert len(open_index(expected)) == 64
    assert_same_index(expected, tmp_path / "ray")
    assert not shard_folder(tmp_path / "ray").exists()


def test_worker_with_another_model_is_refused(local_ray, tmp_path: Path, utm_geotiff: Path) -> None:
    torch.manual_seed(0)
    driver = EncoderRecipe.capture("gem", "random:dinov2_tiny_test", TINY_SIZE)
    torch.manual_seed(1)
    other = EncoderRecipe.capture("gem", "random:dinov2_tiny_test", TINY_SIZE)
    options = RayOptions(other, "auto", workers=1)
    with pytest.raises(DistributedError, match="different encoder") as info:
        build_index(utm_geotiff, tmp_path / "idx", driver.build(), TilingSpec(56, 56, 1.0), progress=False, ray=options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "idx").exists()


def test_recipe_rebuilds_the_same_random_model() -> None:
    torch.manual_seed(3)
    recipe = EncoderRecipe.capture("gem", "random:dinov2_tiny_test", TINY_SIZE)
    after = torch.get_rng_state()
    assert recipe.build().identity == recipe.build().identity
    assert torch.equal(torch.get_rng_state(), after)  # building does not move the caller's generator
    torch.manual_seed(3)
    assert recipe.build().identity.weights_sha256 == EncoderRecipe.capture("gem", "random:dinov2_tiny_test", TINY_SIZE).build().identity.weights_sha256
    assert EncoderRecipe.capture("gem", "embedded").rng_state is None


# ------------------------------------------------------------------------------ errors and resources


def test_without_ray_installed_says_what_to_install(tmp_path: Path, utm_geotiff: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main([str(a) for a in ["index", utm_geotiff, "--out", tmp_path / "idx", "--encoder", "gem", *TINY, "--ray", "auto"]])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    assert "cvgl[ray]" in lines[0] and lines[0].startswith("cvgl index: error:")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "no-port-here"])
def test_unreachable_or_bad_address_is_one_line(tmp_path: Path, utm_geotiff: Path, address: str, capsys) -> None:
    pytest.importorskip("ray.data")
    address = address.format(port=_closed_port())
    started = time.perf_counter()
    code = main([str(a) for a in ["index", utm_geotiff, "--out", tmp_path / "idx", "--encoder", "gem", *TINY, "--ray", address]])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert address in lines[0]
    assert "unreachable" in lines[0] or "HOST:PORT" in lines[0]
    assert time.perf_counter() - started < 30  # no minute-long connection retries
    assert not (tmp_path / "idx").exists()


@given(cpus=st.integers(1, 256), workers=st.integers(1, 64))
def test_actors_always_leave_cpu_for_read_tasks(cpus: int, workers: int) -> None:
    """The deadlock guard: N actors never take every CPU slot, whatever the cluster size."""
    try:
        per_actor = actor_cpus(cpus, workers)
    except DistributedError:
        assert (cpus - READER_CPU_RESERVE) / workers < 0.1
        return
    assert 0 < per_actor <= 1.0
    assert workers * per_actor + READER_CPUS <= cpus + 1e-9


# ------------------------------------------------------------------------------ real weights


@pytest.mark.real
def test_ray_equals_in_process_with_real_weights(local_ray, tmp_path: Path) -> None:
    """The default encoder on part of Longmont (16 tiles of 224 px), 2 actors vs this process."""
    source = longmont_scene("wv3")
    spec = TilingSpec(tile_m=112, stride_m=224, gsd_m=0.5)
    recipe = EncoderRecipe.capture("gem-l8-raw", "embedded")
    encoder = recipe.build()
    torch.set_num_threads(1)
    local = build_index(source, tmp_path / "local", encoder, spec, progress=False, shard_size=4)
    ray = build_index(source, tmp_path / "ray", encoder, spec, progress=False, shard_size=4, ray=RayOptions(recipe, "auto", 2))
    assert len(open_index(local)) == 16
    assert_same_index(local, ray)


# ------------------------------------------------------------------------------ benchmark text


@pytest.mark.parametrize(("ray_seconds", "expected"), [(30.0, "does not make Ray faster"), (60.0, "% behind"), (40.5, "within 5 %")])
def test_benchmark_text_follows_the_numbers(ray_seconds: float, expected: str) -> None:
    from cvgl.bench.ray_index import Result, Row, render

    rows = [Row("in process, 2 torch threads", 256, 50.0, 1.0), Row("in process, 1 torch thread", 256, 40.0, 1.0),
            Row("Ray Data, 2 actors x 1 thread (local instance)", 256, ray_seconds, 1.0)]
    text = render(Result(rows, 6.0, 1.0, True, True, 3e-7, 2, 112.0, 56.0, 0.5, 32, 2, False, 2))
    assert expected in text
    assert "3.0e-07" in text and "2 threads was slower than 1 thread" in text
    assert f"| {256 / ray_seconds:.1f} |" in text
