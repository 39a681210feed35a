"""``cvgl track`` end to end on a tiny random-encoder index: frames cut by code from the index's
own GeoTIFF, stills ordered by EXIF time or name, a video, bad frames, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import torch
from conftest import textured_rgb, write_geotiff
from PIL import ExifTags, Image

from cvgl.answer import schema
from cvgl.cli import main
from cvgl.geo import geodesic_distance_m
from cvgl.track import TileStates

TINY = ["--weights", "random:dinov2_tiny_test", "--input-size", "56"]
TILING = ["--tile-m", "56", "--stride-m", "28", "--gsd", "1.0"]
FAST = ["--rotations", "2", "--refine", "off", *TINY]


def run(argv: list) -> int:
    """``cvgl ARGV`` in-process (random weights from torch's default seed); usage errors exit 2."""
    torch.manual_seed(0)
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code)


def error_lines(err: str) -> list[str]:
    lines = []
    for line in err.splitlines():
        line = line.split("\r")[-1].strip()
        progress = line.startswith("cvgl: ") and line.endswith("...")
        if line and not progress and "it/s" not in line and "s/it" not in line and "tile/s" not in line and "frame/s" not in line:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def ground() -> np.ndarray:
    """The scene both the index and the frames come from (200 x 200 px at 1 m, HWC)."""
    return np.ascontiguousarray(textured_rgb(200, 200).transpose(1, 2, 0))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, ground: np.ndarray) -> Path:
    """One tiny index for the module (built once: the tests only read it)."""
    folder = tmp_path_factory.mktemp("track_index")
    tif = write_geotiff(folder / "ortho.tif", np.ascontiguousarray(ground.transpose(2, 0, 1)))
    out = folder / "idx"
    assert run(["index", tif, "--out", out, "--encoder", "gem", *TINY, *TILING]) == 0
    return out


def _crops(ground: np.ndarray, count: int, side: int = 70) -> list[np.ndarray]:
    """Frames flown west to east across the scene (the flight the index has to find)."""
    xs = np.linspace(20, 200 - side - 20, count).astype(int)
    return [ground[60:60 + side, x:x + side].copy() for x in xs]


def _save(path: Path, image: np.ndarray, when: str | None = None) -> Path:
    exif = Image.Exif()
    if when is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[0x9003] = when
    Image.fromarray(image).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _answers(path: Path) -> list[dict]:
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    for answer in answers:
        jsonschema.validate(answer, schema())
    return answers


def test_stills_by_exif_time_give_one_answer_per_frame_and_a_linestring(index, ground, tmp_path, capsys) -> None:
    folder = tmp_path / "flight"
    folder.mkdir()
    crops = _crops(ground, 5)
    # Names disagree with time on purpose: the capture time orders the flight.
    names = ["e.jpg", "d.jpg", "c.jpg", "b.jpg", "a.jpg"]
    for k, (name, crop) in enumerate(zip(names, crops)):
        _save(folder / name, crop, f"2024:05:01 10:00:{2 * k:02d}")
    (folder / "zz_blank.jpg").write_bytes(b"")  # a bad frame among good ones
    out, geo, page = tmp_path / "t.jsonl", tmp_path / "t.geojson", tmp_path / "t.html"
    code = run(["track", index, folder, "--json", out, "--geojson", geo, "--map", page, *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answers = _answers(out)
    # The readable frames keep their clock order; the unreadable one comes last, skipped.
    assert not any("file-name order" in line for line in error_lines(captured.err))
    assert [Path(a["query"]).name for a in answers] == [*names, "zz_blank.jpg"]
    skipped = [a for a in answers if a["status"] == "skipped"]
    assert len(skipped) == 1 and "zz_blank.jpg" in skipped[0]["reason"] and "\n" not in skipped[0]["reason"]
    assert [line for line in error_lines(captured.err) if line.startswith("skipped:")] == [f"skipped: {skipped[0]['reason']}"]
    located = [a for a in answers if a["status"] != "skipped"]
    assert len(located) == 5
    for k, a in enumerate(located):
        assert a["position_source"] == "track"
        assert a["track"]["method"] == "shape" and a["track"]["frame"] == k
        assert a["track"]["time_s"] == pytest.approx(2.0 * k) and a["track"]["time_source"] == "exif"
        assert 40.1 < a["lat"] < 40.2 and -105.2 < a["lon"] < -105.1
        assert a["confidence_radius_m"] == a["uncertainty_m"] > 0
    collection = json.loads(geo.read_text())
    line = collection["features"][0]
    assert line["geometry"]["type"] == "LineString"
    assert line["geometry"]["coordinates"] == [[a["lon"], a["lat"]] for a in located]
    assert [f["geometry"]["type"] for f in collection["features"][1:]] == ["Point"] * 5
    html = page.read_text()
    assert "track (shape)" in html and "frames alone (locate)" in html
    assert "Traceback" not in captured.err


def test_stills_with_times_follow_the_clock_not_the_names(index, ground, tmp_path, capsys) -> None:
    crops = _crops(ground, 4)
    paths = [_save(tmp_path / f"img_{9 - k}.jpg", crop, f"2024:05:01 10:00:{3 * k:02d}") for k, crop in enumerate(crops)]
    out = tmp_path / "t.jsonl"
    assert run(["track", index, *paths[::-1], "--json", out, "--method", "hmm", "--causal", *FAST]) == 0
    answers = _answers(out)
    assert [Path(a["query"]).name for a in answers] == [p.name for p in paths]
    assert [a["track"]["time_s"] for a in answers] == pytest.approx([0.0, 3.0, 6.0, 9.0])
    assert {a["track"]["time_source"] for a in answers} == {"exif"}
    assert {a["track"]["method"] for a in answers} == {"hmm-causal"}
    assert "file-name order" not in capsys.readouterr().err


def test_every_method_runs_and_independent_matches_locate(index, ground, tmp_path, capsys) -> None:
    """The ``independent`` decoder is locate's per-photo rule: same evidence, same heading, and the
    same position up to the radius edge case below."""
    folder = tmp_path / "f"
    folder.mkdir()
    for k, crop in enumerate(_crops(ground, 4)):
        _save(folder / f"f{k}.jpg", crop)
    located = tmp_path / "locate.jsonl"
    assert run(["locate", index, folder, "--json", located, *FAST]) == 0
    alone = _answers(located)
    for method in ("independent", "hmm", "particle", "shape"):
        out = tmp_path / f"{method}.jsonl"
        assert run(["track", index, folder, "--json", out, "--method", method, *FAST]) == 0, capsys.readouterr().err
        answers = _answers(out)
        assert len(answers) == 4 and all(a["status"] in ("located", "not_found") for a in answers)
        if method == "independent":
            for a, b in zip(answers, alone):
                assert a["top_k"] == b["top_k"] and a["heading_deg"] == pytest.approx(b["heading_deg"])
                # Same rule; the radius is measured in UTM metres there and geodesically in locate, so
                # a neighbour lying exactly on the radius (this lattice's diagonal) may fall either side.
                assert geodesic_distance_m(a["lat"], a["lon"], b["lat"], b["lon"]) < 0.5 * 28.0  # half the stride
    capsys.readouterr()


def _video(path: Path, frames: list[np.ndarray], fps: float = 4.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


def test_video_frames_are_sampled_and_tracked(index, ground, tmp_path, capsys) -> None:
    video = _video(tmp_path / "flight.avi", _crops(ground, 8))  # 2 s at 4 fps
    out, geo = tmp_path / "v.jsonl", tmp_path / "v.geojson"
    code = run(["track", index, video, "--fps", "2", "--json", out, "--geojson", geo, "--causal", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answers = _answers(out)
    assert [a["query"] for a in answers] == [f"{video}#f{i:05d}" for i in (0, 2, 4, 6)]
    assert [a["track"]["time_s"] for a in answers] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=0.01)
    assert {a["track"]["method"] for a in answers} == {"particle-causal"}
    assert {a["track"]["time_source"] for a in answers} == {"video"}
    assert len(json.loads(geo.read_text())["features"][0]["geometry"]["coordinates"]) == 4


def test_a_blank_video_frame_is_skipped_not_the_flight(index, ground, tmp_path, capsys) -> None:
    frames = _crops(ground, 4)
    frames[2] = np.full_like(frames[2], 90)  # a uniform frame (lens cap, a cloud): no evidence
    video = _video(tmp_path / "flight.avi", frames)
    out = tmp_path / "v.jsonl"
    assert run(["track", index, video, "--fps", "100", "--json", out, *FAST]) == 0
    answers = _answers(out)
    assert [a["status"] for a in answers].count("skipped") == 1
    assert answers[2]["status"] == "skipped" and "#f00002" in answers[2]["reason"] and "uniform" in answers[2]["reason"]
    geo_frames = [a for a in answers if a["status"] != "skipped"]
    assert [a["track"]["frame"] for a in geo_frames] == [0, 1, 3]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing video", "corrupt video", "video and photos", "all frames bad", "no photo in folder",
                                  "bad method", "near without radius"])
def test_bad_inputs_are_one_line_errors(index, ground, tmp_path, capsys, case) -> None:
    photo = _save(tmp_path / "p.jpg", _crops(ground, 1)[0])
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"not a video at all" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    argv, code, needle = {
        "missing video": ([tmp_path / "gone.mp4"], 2, "gone.mp4"),
        "corrupt video": ([corrupt], 2, "broken.mp4"),
        "video and photos": ([corrupt, photo], 2, "one video"),
        "all frames bad": ([empty], 2, "empty.jpg"),
        "no photo in folder": ([tmp_path / "nothing"], 2, "holds no photo"),
        "bad method": ([photo, "--method", "kalman"], 2, "--method"),
        "near without radius": ([photo, "--near", "40.15,-105.1"], 2, "--radius-km"),
    }[case]
    assert run(["track", index, *argv, *FAST]) == code
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert lines[0].startswith("cvgl track: error:") and captured.out == ""


# ------------------------------------------------------------------------------ evidence helpers


def test_fold_scales_is_the_best_over_scales_per_heading() -> None:
    from cvgl.track.sequence import fold_scales

    rng = np.random.default_rng(0)
    headings = np.array([0.0, 90.0, 180.0, 270.0] * 3)  # 4 headings x 3 scales, as prepare_query orders them
    matrix = rng.normal(size=(12, 7)).astype(np.float32)
    matrix[5, 2] = -np.inf  # an unscored tile of one hypothesis
    folded, grid = fold_scales(matrix, headings)
    assert grid.tolist() == [0.0, 90.0, 180.0, 270.0]
    for k, heading in enumerate(grid):  # plain reference: max over the rows of that heading
        rows = [matrix[i] for i in range(12) if headings[i] == heading]
        assert np.array_equal(folded[k], np.max(rows, axis=0))
    one, grid1 = fold_scales(matrix[:4][::-1], headings[:4][::-1])  # one scale: rows only sorted by heading
    assert grid1.tolist() == [0.0, 90.0, 180.0, 270.0] and np.array_equal(one, matrix[:4])


def test_a_verified_answer_becomes_a_one_sigma_fix_in_the_states_crs() -> None:
    from cvgl.answer import Answer
    from cvgl.geo import from_latlon
    from cvgl.track.sequence import VERIFIED_COVERAGE_SIGMAS, verified_fix

    lat, lon = np.array([40.15, 40.15, 40.151]), np.array([-105.1, -105.099, -105.1])
    states = TileStates.from_latlon(lat, lon)
    answer = Answer("f.jpg", 40.1505, -105.0995, 6.45, 0.9, "m", 0.0, "verified", 0.0, None, [], position_source="verified")
    fix = verified_fix(answer, states)
    x, y = from_latlon(states.crs, 40.1505, -105.0995)
    assert (fix.x, fix.y) == pytest.approx((x, y)) and fix.radius_m == pytest.approx(6.45 / VERIFIED_COVERAGE_SIGMAS)
    answer.position_source = "retrieval"
    assert verified_fix(answer, states) is None
