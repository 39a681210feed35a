"""Frame sources: stills ordered by EXIF/XMP capture time or file name, videos sampled by time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from cvgl.data.frames import (
    natural_key,
    order_stills,
    probe_video,
    read_capture_time,
    sample_video,
    video_order,
)
from cvgl.errors import InputError


def _still(path: Path, when: str | None = None, subsec: str | None = None, offset: str | None = None,
           xmp: str | None = None) -> Path:
    exif = Image.Exif()
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if when is not None:
        sub[0x9003] = when
    if subsec is not None:
        sub[0x9291] = subsec
    if offset is not None:
        sub[0x9011] = offset
    kwargs = {"exif": exif.tobytes()}
    if xmp is not None:
        kwargs["xmp"] = xmp.encode()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path, "JPEG", **kwargs)
    return path


def _dji_xmp(create_date: str) -> str:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"'
            f' xmp:CreateDate="{create_date}" drone-dji:GimbalYawDegree="+12.30"/></rdf:RDF></x:xmpmeta>')


def test_natural_key_orders_numbers_by_value():
    names = ["DJI_0010.JPG", "DJI_0009.JPG", "dji_0100.jpg", "frame2.png", "frame10.png", "frame1.png"]
    assert sorted(names, key=natural_key) == ["DJI_0009.JPG", "DJI_0010.JPG", "dji_0100.jpg",
                                              "frame1.png", "frame2.png", "frame10.png"]


def test_exif_time_with_subseconds_and_offset(tmp_path):
    a = read_capture_time(_still(tmp_path / "a.jpg", "2024:05:01 10:00:01", "25"))
    b = read_capture_time(_still(tmp_path / "b.jpg", "2024:05:01 10:00:02", "750"))
    assert a.source == "exif" and a.resolution_s == pytest.approx(0.01)
    assert b.seconds - a.seconds == pytest.approx(1.5)
    c = read_capture_time(_still(tmp_path / "c.jpg", "2024:05:01 12:00:01", "25", offset="+02:00"))
    assert c.seconds == pytest.approx(a.seconds)  # the same instant in another zone
    assert read_capture_time(_still(tmp_path / "d.jpg", "2024:05:01 10:00:01")).resolution_s == 1.0
    assert read_capture_time(_still(tmp_path / "e.jpg", "0000:00:00 00:00:00")) is None
    assert read_capture_time(_still(tmp_path / "f.jpg")) is None


def test_dji_xmp_create_date_when_exif_has_none(tmp_path):
    t = read_capture_time(_still(tmp_path / "a.jpg", xmp=_dji_xmp("2023-07-14T09:12:30.40")))
    u = read_capture_time(_still(tmp_path / "b.jpg", xmp=_dji_xmp("2023-07-14T09:12:32.15")))
    assert t.source == "xmp" and t.resolution_s == pytest.approx(0.01)
    assert u.seconds - t.seconds == pytest.approx(1.75)


def test_stills_ordered_by_time_not_name(tmp_path):
    # Names run against the clock: the times decide.
    paths = [_still(tmp_path / f"img{i}.jpg", f"2024:05:01 10:00:{10 - 2 * i:02d}", "5") for i in range(4)]
    order = order_stills(paths)
    assert [f.path.name for f in order.frames] == ["img3.jpg", "img2.jpg", "img1.jpg", "img0.jpg"]
    np.testing.assert_allclose(order.times_s, [0.0, 2.0, 4.0, 6.0])
    assert order.time_source == "exif" and order.time_resolution_s == pytest.approx(0.1) and order.note == ""


def test_missing_times_fall_back_to_file_names_with_a_stated_interval(tmp_path):
    paths = [_still(tmp_path / "DJI_0010.jpg", "2024:05:01 10:00:00"), _still(tmp_path / "DJI_0009.jpg"),
             _still(tmp_path / "DJI_0011.jpg", "2024:05:01 09:00:00")]
    order = order_stills(paths, assumed_interval_s=2.0)
    assert [f.path.name for f in order.frames] == ["DJI_0009.jpg", "DJI_0010.jpg", "DJI_0011.jpg"]
    np.testing.assert_allclose(order.times_s, [0.0, 2.0, 4.0])
    assert order.time_source == "file-name"
    assert "no capture time in 1 of 3 frames" in order.note and "2 s assumed" in order.note
    same = [_still(tmp_path / f"s{i}.jpg", "2024:05:01 10:00:00") for i in range(3)]
    assert order_stills(same).time_source == "file-name"  # equal times order nothing


def test_bad_still_inputs_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="junk.jpg") as err:
        order_stills([junk])
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="no frames"):
        order_stills([])
    good = _still(tmp_path / "a.jpg", "2024:05:01 10:00:00")
    with pytest.raises(InputError, match="given twice"):
        order_stills([good, good])
    with pytest.raises(InputError, match="interval"):
        order_stills([good], assumed_interval_s=0)


def _video(path: Path, frames: int = 25, fps: float = 10.0, size=(64, 48)) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (8 * i) % 256, np.uint8))  # brightness encodes the frame number
    writer.release()
    return path


def test_video_sampled_by_time(tmp_path):
    video = _video(tmp_path / "flight.avi")
    info = probe_video(video)
    assert info.fps == pytest.approx(10.0) and (info.width, info.height) == (64, 48)
    frames = list(sample_video(video, fps=2.0))
    assert [f.index for f in frames] == [0, 5, 10, 15, 20]
    np.testing.assert_allclose([f.time_s for f in frames], [0.0, 0.5, 1.0, 1.5, 2.0], atol=1e-6)
    brightness = [round(f.image.mean() / 8) for f in frames]
    assert brightness == [0, 5, 10, 15, 20]  # the pixels are those frames' pixels
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    assert len(list(sample_video(video, fps=100.0))) == 25  # above the native rate: every frame
    assert [f.index for f in sample_video(video, fps=3.0)] == [0, 3, 7, 10, 13, 17, 20, 23]
    order = video_order(frames)
    assert order.time_source == "video" and order.frames[2].index == 10


def test_video_streams_in_bounded_memory(tmp_path):
    video = _video(tmp_path / "long.avi", frames=150, size=(320, 240))
    frame_bytes = 320 * 240 * 3
    tracemalloc.start()
    try:
        count = sum(1 for _ in sample_video(video, fps=1000.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 150
    assert peak < 10 * frame_bytes  # a few frames at a time, not 150


def test_bad_videos_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(sample_video(tmp_path / "missing.mp4", 1.0))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"nonsense" * 100)
    with pytest.raises(InputError, match="junk.mp4: not a readable video") as err:
        list(sample_video(junk, 1.0))
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        probe_video(empty)
    with pytest.raises(InputError, match="positive"):
        list(sample_video(_video(tmp_path / "ok.avi"), 0.0))
