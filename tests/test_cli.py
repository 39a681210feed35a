"""The command line, in-process: exit codes, one-line errors on stderr, bad photos skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import jsonschema
import pytest
import torch
from PIL import Image

from cvgl.answer import schema
from cvgl.cli import main

TINY = ["--weights", "random:dinov2_tiny_test", "--input-size", "56"]
TILING = ["--tile-m", "56", "--stride-m", "28", "--gsd", "1.0"]


def run(argv: list[str]) -> int:
    """``cvgl ARGV`` as one process would run it: random weights from torch's default seed."""
    torch.manual_seed(0)
    return main([str(a) for a in argv])


def error_lines(err: str) -> list[str]:
    """stderr without progress lines (tqdm redraws with carriage returns; the start-up line)."""
    lines = []
    for line in err.splitlines():
        line = line.split("\r")[-1].strip()
        progress = line.startswith("cvgl: ") and line.endswith("...")  # "cvgl: loading the model (...)..."
        if line and not progress and "it/s" not in line and "s/it" not in line and "tile/s" not in line and "photo/s" not in line:
            lines.append(line)
    return lines


@pytest.fixture
def gem_index(tmp_path: Path, utm_geotiff: Path, capsys: pytest.CaptureFixture) -> Path:
    out = tmp_path / "gem_index"
    assert run(["index", utm_geotiff, "--out", out, "--encoder", "gem", *TINY, *TILING]) == 0
    captured = capsys.readouterr()
    assert f"-> {out}" in captured.out
    return out


def _photo(seed: int = 0, size: tuple[int, int] = (90, 120)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ index


def test_index_non_georeferenced_tiff(tmp_path: Path, plain_tiff: Path, capsys: pytest.CaptureFixture) -> None:
    code = run(["index", plain_tiff, "--out", tmp_path / "idx", "--encoder", "gem", *TINY, *TILING])
    captured = capsys.readouterr()
    assert code == 2
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert plain_tiff.name in lines[0]
    assert "georeferenced" in lines[0]
    assert lines[0].startswith("cvgl index: error:")
    assert "Traceback" not in captured.err
    assert not (tmp_path / "idx").exists()


def test_index_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = run(["index", tmp_path / "nowhere.tif", "--out", tmp_path / "idx", "--encoder", "gem", *TINY])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(lines) == 1 and "nowhere.tif" in lines[0]


def test_index_bad_input_size_is_a_one_line_error(utm_geotiff: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A size that is not a multiple of 14 is a user mistake: usage error or one line, no traceback."""
    argv = ["index", utm_geotiff, "--out", tmp_path / "idx", "--encoder", "gem",
            "--weights", "random:dinov2_tiny_test", "--input-size", "100", *TILING]
    try:
        code = run(argv)
    except SystemExit as exc:  # argparse's usage error is fine too
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert "14" in err
    assert not (tmp_path / "idx").exists()


def test_index_manifest_records_encoder(gem_index: Path) -> None:
    manifest = json.loads((gem_index / "manifest.json").read_text())
    assert manifest["encoder"]["preset"] == "gem"
    assert manifest["encoder"]["arch"] == "dinov2_tiny_test"
    assert manifest["encoder"]["input_size"] == [56, 56]
    assert manifest["count"] == ((200 - 56) // 28 + 1) ** 2


# ------------------------------------------------------------------------------ locate


def test_locate_with_other_encoder_is_refused(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_photo()).save(photo)
    code = run(["locate", gem_index, photo, "--encoder", "cls", *TINY])
    captured = capsys.readouterr()
    assert code == 2
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cvgl locate: error:")
    assert str(gem_index) in lines[0]
    assert "'gem'" in lines[0] and "head" in lines[0]
    assert captured.out == ""


def test_locate_with_other_weights_is_refused(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_photo()).save(photo)
    torch.manual_seed(1)  # other random weights, same preset
    code = main(["locate", str(gem_index), str(photo), *TINY])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(lines) == 1 and "weights_sha256" in lines[0]


def test_locate_default_encoder_comes_from_index(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_photo()).save(photo)
    assert run(["locate", gem_index, photo, "--rotations", "2", *TINY]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 1 and "lat" in results[0]


def test_locate_skips_bad_photos(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(_photo()).save(good, quality=95)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(_photo(1, (200, 200))).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    out_json = tmp_path / "results.jsonl"

    code = run(["locate", gem_index, good, empty, truncated, "--json", out_json, "--rotations", "2", "--encoder", "gem", *TINY])
    captured = capsys.readouterr()
    assert code == 0
    results = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [Path(r["query"]).name for r in results] == ["good.jpg", "empty.jpg", "truncated.jpg"]
    for result in results:
        jsonschema.validate(result, schema())

    located = results[0]
    assert located["status"] in ("located", "not_found")  # answered (a random model on random photos may be weak evidence)
    assert {"lat", "lon", "confidence", "heading_deg", "top_k"} <= set(located)
    assert 40.1 < located["lat"] < 40.2 and -105.2 < located["lon"] < -105.1
    assert 0.0 < located["confidence"] <= 1.0 + 1e-9
    assert len(located["top_k"]) == 5
    assert located["heading_source"] == "search"

    for result, name in ((results[1], "empty.jpg"), (results[2], "truncated.jpg")):
        assert set(result) == {"schema", "query", "status", "reason"} and result["status"] == "skipped"
        assert name in result["reason"]
        assert "\n" not in result["reason"]
    skipped = [line for line in error_lines(captured.err) if line.startswith("skipped:")]
    assert len(skipped) == 2
    assert "empty.jpg" in skipped[0] and "truncated.jpg" in skipped[1]
    assert "Traceback" not in captured.err


def test_locate_skips_too_small_photo(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 5x5 px image is a bad photo like any other: reported and skipped, the batch goes on."""
    good = tmp_path / "good.png"
    Image.fromarray(_photo()).save(good)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(_photo(2, (5, 5))).save(tiny)
    out_json = tmp_path / "results.jsonl"
    code = run(["locate", gem_index, tiny, good, "--json", out_json, "--rotations", "2", "--encoder", "gem", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert "tiny.png" in results[0]["reason"]
    assert results[1]["status"] in ("located", "not_found")


def test_locate_all_bad_exits_nonzero(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Unreadable photos are found from their headers, before the model loads: one line, exit 2.
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert run(["locate", gem_index, empty, *TINY]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and [line for line in error_lines(captured.err)] == [
        f"cvgl locate: error: {empty}: file is empty (0 bytes); re-export or re-download it"]
    # Readable photos that all fail later are each a skipped answer: exit 1.
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((90, 120, 3), 128, np.uint8)).save(blank)
    assert run(["locate", gem_index, blank, *TINY]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"


def _write_modes(folder: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (80, 100, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0
    gray = rng.integers(0, 256, (80, 100), dtype=np.uint8)
    deep = (rng.integers(0, 4096, (80, 100)) * 16).astype(np.uint16)
    paths = [folder / "rgba.png", folder / "gray.png", folder / "deep16.png"]
    Image.fromarray(rgba, "RGBA").save(paths[0])
    Image.fromarray(gray, "L").save(paths[1])
    Image.fromarray(deep).save(paths[2])
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b, Image.open(paths[2]) as c:
        assert (a.mode, b.mode) == ("RGBA", "L")
        assert c.mode.startswith("I")  # really a 16-bit PNG
    return paths


def test_locate_png_modes(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_modes(tmp_path)
    out_json = tmp_path / "modes.jsonl"
    code = run(["locate", gem_index, *paths, "--json", out_json, "--heading", "0", "--encoder", "gem", *TINY])
    captured = capsys.readouterr()
    assert code == 0
    results = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert len(results) == 3
    for result, path in zip(results, paths):
        assert result["status"] in ("located", "not_found"), result
        assert Path(result["query"]).name == path.name
        assert np.isfinite([result["lat"], result["lon"], result["confidence"]]).all()
        assert result["heading_source"] == "flag"
    assert not [line for line in error_lines(captured.err) if line.startswith("skipped:")]


def test_locate_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "p.jpg"
    Image.fromarray(_photo()).save(photo)
    code = run(["locate", tmp_path / "no_index", photo, *TINY])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(lines) == 1 and "no_index" in lines[0]


# ------------------------------------------------------------------------------ tile folder + search


def test_tile_folder_index_and_scale_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder of tiles + tiles.csv indexes; a photo without altitude searches heading and scale,
    and the JSON reports the winning heading and scale; the tile that *is* the photo comes first."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    rows = ["id,lat,lon"]
    for i in range(6):
        Image.fromarray(_photo(100 + i, (56, 56))).save(folder / f"t{i}.png")
        rows.append(f"t{i},{40.0 + i * 0.001:.6f},-105.0")
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "folder_index"
    assert run(["index", folder, "--out", out, "--encoder", "gem", *TINY]) == 0
    photo = tmp_path / "photo.png"
    Image.fromarray(np.rot90(np.asarray(Image.open(folder / "t3.png")), k=-1).copy()).save(photo)
    capsys.readouterr()
    result_path = tmp_path / "out.jsonl"
    code = run(["locate", out, photo, "--encoder", "gem", *TINY, "--view", "drone", "--rotations", "4",
                "--scales", "0.5,1.0", "--json", result_path, "--top-k", "3"])
    assert code == 0
    (result,) = [json.loads(line) for line in result_path.read_text().splitlines()]
    assert result["top_k"][0]["tile_id"] == "t3"
    assert result["heading_source"] == "search"
    assert result["heading_deg"] == pytest.approx(270.0)  # undoing a quarter turn clockwise
    assert result["scale"] == 1.0
    assert 0.0 < result["confidence"] <= 1.0


def test_grid_alone_writes_only_the_grid_where_asked(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(7)).save(photo)
    grid = tmp_path / "figures" / "g.png"
    assert run(["locate", gem_index, photo, "--encoder", "gem", *TINY, "--grid", grid, "--rotations", "2"]) == 0
    assert grid.is_file()
    assert not (grid.parent / "map.html").exists()
    with Image.open(grid) as image:
        assert image.width > 100


def test_bad_numeric_flags_are_usage_errors(gem_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(8)).save(photo)
    for flag in (["--rotations", "0"], ["--top-k", "0"], ["--pitch", "95"], ["--altitude", "-3"]):
        with pytest.raises(SystemExit) as info:
            run(["locate", gem_index, photo, "--encoder", "gem", *TINY, *flag])
        assert info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_a_photo_failing_inside_a_library_is_skipped_not_the_batch(gem_index: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """An OpenCV/numpy error from one photo (not a cvgl error) costs only that photo its answer."""
    import cv2

    import cvgl.locate

    real = cvgl.locate.prepare_query

    def flaky(path, *args, **kwargs):
        if Path(path).name == "bad.png":
            raise cv2.error("OpenCV(4.x) resize.cpp:4152: error: (-215:Assertion failed) !ssize.empty()")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cvgl.locate, "prepare_query", flaky)
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(_photo(3)).save(good)
    Image.fromarray(_photo(4)).save(bad)
    code = run(["locate", gem_index, bad, good, "--rotations", "2", "--encoder", "gem", *TINY])
    captured = capsys.readouterr()
    assert code == 0
    first, second = [json.loads(line) for line in captured.out.splitlines()]
    assert first["status"] == "skipped" and "bad.png" in first["reason"] and "error" in first["reason"]
    assert second["status"] in ("located", "not_found")
    assert "Traceback" not in captured.err
