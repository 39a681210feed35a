"""The frames of one flight, in time order: still photos ordered by capture time, or a video sampled.

A sequence decoder (:mod:`cvgl.track`) needs, for every frame, *when* it was taken: the time
between frames times the maximum speed bounds how far the drone can have moved. Two sources:

* **Stills.** The capture time is read from EXIF ``DateTimeOriginal`` + ``SubSecTimeOriginal``
  (+ ``OffsetTimeOriginal``), falling back to ``DateTimeDigitized``, then to the XMP packet
  (``exif:DateTimeOriginal``, ``xmp:CreateDate``, ``photoshop:DateCreated`` — where DJI drones
  put it, with fractional seconds when the firmware writes them). EXIF times without sub-seconds
  have a 1 s resolution, which is recorded (:attr:`FrameOrder.time_resolution_s`) so the motion
  model can widen its bound by it. When *any* frame lacks a time — or all times are equal — the
  times cannot be trusted to order the flight: the frames are taken in natural file-name order
  (``DJI_0009`` before ``DJI_0010``) with an *assumed* interval, and :attr:`FrameOrder.note` says so.
* **Video.** :func:`sample_video` streams frames with OpenCV (FFmpeg backend) at a requested
  rate, one decoded frame in memory at a time, with each frame's presentation time.

Bad input is a one-line :class:`~cvgl.errors.InputError` naming the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags

from cvgl.data.images import open_image
from cvgl.errors import InputError

_TAG_XMP = 700
_TAG_DATETIME_ORIGINAL, _TAG_SUBSEC_ORIGINAL, _TAG_OFFSET_ORIGINAL = 0x9003, 0x9291, 0x9011
_TAG_DATETIME_DIGITIZED, _TAG_SUBSEC_DIGITIZED, _TAG_OFFSET_DIGITIZED = 0x9004, 0x9292, 0x9012
_XMP_SCAN_BYTES = 1024 * 1024  # DJI writes its XMP packet near the start of the file
_XMP_TIME_FIELDS = ("exif:DateTimeOriginal", "xmp:CreateDate", "photoshop:DateCreated")
DEFAULT_INTERVAL_S = 1.0  # assumed time between stills that carry no capture time


@dataclass(frozen=True)
class CaptureTime:
    """When a still was taken: seconds on the camera's clock, where they came from, how precise."""

    seconds: float  # POSIX seconds; a time without a zone offset is read as UTC (only differences matter)
    source: str  # "exif" | "xmp"
    resolution_s: float  # 1.0 for whole seconds, 0.01 for two sub-second digits, ...


@dataclass(frozen=True)
class TimedFrame:
    """One frame of a sequence: a still (``path``) or a video frame (``index`` in the video)."""

    time_s: float  # seconds since the first frame of the sequence
    path: Path | None = None
    index: int | None = None


@dataclass(frozen=True)
class FrameOrder:
    """Frames in time order, how their times were obtained, and what was assumed."""

    frames: list[TimedFrame]
    time_source: str  # "exif" | "xmp" | "exif+xmp" | "file-name" | "video"
    time_resolution_s: float  # add to every interval for a safe bound on the time between frames
    note: str = ""  # what was assumed, for the answer ("" when nothing was)

    @property
    def times_s(self) -> np.ndarray:
        return np.array([f.time_s for f in self.frames], dtype=np.float64)


@dataclass(frozen=True)
class VideoFrame:
    image: np.ndarray  # H x W x 3 uint8 RGB
    time_s: float  # presentation time in the video
    index: int  # frame number in the video (0-based)


@dataclass(frozen=True)
class VideoInfo:
    fps: float | None  # as the container states it; None when it does not
    frame_count: int | None  # container's count, often approximate; None when unknown
    width: int
    height: int


# --------------------------------------------------------------------------- stills


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``img2`` < ``img10``, case-insensitive."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts if p)


def read_capture_time(path: str | Path) -> CaptureTime | None:
    """The capture time of a still from EXIF, else XMP; None when the file records none.

    Only an unreadable file raises (:class:`InputError`, from :func:`cvgl.data.images.open_image`).
    """
    p = Path(path)
    with open_image(p) as img:
        exif_ifd: dict[int, Any] = {}
        ifd0: dict[int, Any] = {}
        try:
            exif = img.getexif()
            ifd0 = dict(exif)
            exif_ifd = dict(exif.get_ifd(ExifTags.IFD.Exif))
        except Exception:  # noqa: BLE001, S110 - corrupt EXIF means "no time", not "bad image"
            pass
        packets = [img.info.get("xmp"), img.info.get("XML:com.adobe.xmp"), ifd0.get(_TAG_XMP)]
    for tags in ((_TAG_DATETIME_ORIGINAL, _TAG_SUBSEC_ORIGINAL, _TAG_OFFSET_ORIGINAL),
                 (_TAG_DATETIME_DIGITIZED, _TAG_SUBSEC_DIGITIZED, _TAG_OFFSET_DIGITIZED)):
        found = _exif_time(*(exif_ifd.get(tag, ifd0.get(tag)) for tag in tags))
        if found is not None:
            return CaptureTime(found[0], "exif", found[1])
    texts = [t for t in map(_text, packets) if t]
    if not texts:
        texts = _scan_for_xmp(p)
    for text in texts:
        for name in _XMP_TIME_FIELDS:
            found = _xmp_time(text, name)
            if found is not None:
                return CaptureTime(found[0], "xmp", found[1])
    return None


def order_stills(paths: Sequence[str | Path], assumed_interval_s: float = DEFAULT_INTERVAL_S) -> FrameOrder:
    """Order still frames by capture time, or by natural file name when times are missing.

    Frames with equal times keep file-name order between them. ``assumed_interval_s`` is used
    only in the file-name fallback, and the returned note states it.
    """
    if not paths:
        raise InputError("no frames given; pass the photos of one flight (or --video FILE)")
    if not assumed_interval_s > 0 or not math.isfinite(assumed_interval_s):
        raise InputError(f"assumed frame interval {assumed_interval_s!r} s: must be a positive number of seconds")
    items = [Path(p) for p in paths]
    seen: set[Path] = set()
    for p in items:
        if p.resolve() in seen:
            raise InputError(f"{p}: given twice; each frame of a flight once")
        seen.add(p.resolve())
    times = [read_capture_time(p) for p in items]
    missing = sum(t is None for t in times)
    if missing == 0 and (len(items) == 1 or len({t.seconds for t in times}) > 1):
        by_time = sorted(range(len(items)), key=lambda i: (times[i].seconds, natural_key(items[i].name)))
        t0 = times[by_time[0]].seconds
        frames = [TimedFrame(time_s=times[i].seconds - t0, path=items[i]) for i in by_time]
        sources = sorted({t.source for t in times})
        return FrameOrder(frames, "+".join(sources), max(t.resolution_s for t in times))
    ordered = sorted(items, key=lambda p: natural_key(p.name))
    frames = [TimedFrame(time_s=i * assumed_interval_s, path=p) for i, p in enumerate(ordered)]
    why = (f"no capture time in {missing} of {len(items)} frames" if missing
           else f"all {len(items)} frames carry the same capture time")
    note = f"{why}: frames taken in file-name order, {assumed_interval_s:g} s assumed between frames"
    # The assumed interval may be wrong either way: half of it again as a bound on the error.
    return FrameOrder(frames, "file-name", 0.5 * assumed_interval_s, note)


def _exif_time(value: Any, subsec: Any, offset: Any) -> tuple[float, float] | None:
    text = _text(value)
    if not text:
        return None
    try:
        moment = datetime.strptime(text.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None  # "0000:00:00 00:00:00" and other placeholders: no time
    resolution = 1.0
    digits = re.sub(r"\D", "", _text(subsec) or "")
    if digits:
        moment += timedelta(seconds=int(digits) / 10 ** len(digits))
        resolution = 10.0 ** -len(digits)
    return _seconds(moment, _text(offset)), resolution


_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?\s*(Z|[+-]\d{2}:?\d{2})?")


def _xmp_time(packet: str, qname: str) -> tuple[float, float] | None:
    """``qname`` as an attribute or element holding an ISO 8601 time, as (seconds, resolution)."""
    name = re.escape(qname)
    match = re.search(rf"(?<![\w.:-]){name}\s*=\s*([\"'])(.*?)\1", packet, re.DOTALL) or re.search(
        rf"<{name}(?:\s[^>]*)?>([^<]*)</{name}\s*>", packet)
    if not match:
        return None
    iso = _ISO.search(match.group(match.lastindex or 1))
    if not iso:
        return None
    year, month, day, hour, minute, second, fraction, zone = iso.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0))
    except ValueError:
        return None
    resolution = 60.0 if second is None else 1.0
    if fraction:
        moment += timedelta(seconds=int(fraction) / 10 ** len(fraction))
        resolution = 10.0 ** -len(fraction)
    return _seconds(moment, "+00:00" if zone == "Z" else zone), resolution


def _seconds(moment: datetime, offset: str | None) -> float:
    """POSIX seconds of a camera time; with a ``+HH:MM`` offset it is converted to UTC."""
    zone = timezone.utc
    match = re.fullmatch(r"\s*([+-])(\d{2}):?(\d{2})\s*", offset or "")
    if match:
        sign = 1 if match.group(1) == "+" else -1
        zone = timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))
    return moment.replace(tzinfo=zone).timestamp()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _scan_for_xmp(p: Path) -> list[str]:
    """XMP packets in the first bytes of the file, for containers Pillow does not surface them in."""
    try:
        with p.open("rb") as fp:
            head = fp.read(_XMP_SCAN_BYTES)
    except OSError:
        return []
    start = head.find(b"<x:xmpmeta")
    if start == -1:
        return []
    end = head.find(b"</x:xmpmeta>", start)
    return [head[start:end if end != -1 else len(head)].decode("utf-8", errors="replace")]


# --------------------------------------------------------------------------- video


def _open_video(path: Path):
    import cv2

    if not path.exists():
        raise InputError(f"{path}: video file not found; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a video file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: video file is empty (0 bytes)")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise InputError(f"{path}: not a readable video (FFmpeg could not open it); convert it to MP4 (H.264)")
    return capture


def probe_video(path: str | Path) -> VideoInfo:
    """Rate, frame count and size as the container states them (no frame is decoded)."""
    import cv2

    p = Path(path)
    capture = _open_video(p)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    return VideoInfo(
        fps=float(fps) if math.isfinite(fps) and fps > 0 else None,
        frame_count=int(count) if math.isfinite(count) and count > 0 else None,
        width=width,
        height=height,
    )


def sample_video(path: str | Path, fps: float, max_frames: int | None = None) -> Iterator[VideoFrame]:
    """Stream the frames of a video at about ``fps`` frames per second, in order.

    Every frame is grabbed (demuxed and decoded by FFmpeg) but only the kept ones are converted
    to RGB arrays, and one frame is held at a time: memory does not grow with the video's length.
    A frame is kept when its presentation time reaches the next sample time (``k / fps``), so a
    variable-rate video is sampled by time, not by frame count; asking for more than the native
    rate keeps every frame. Times come from the container (``CAP_PROP_POS_MSEC``), or from the
    frame number and the stated rate when the container gives none.
    """
    import cv2

    p = Path(path)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InputError(f"{p}: sampling rate {fps!r} frames per second must be a positive number")
    capture = _open_video(p)
    try:
        native = capture.get(cv2.CAP_PROP_FPS)
        native = native if math.isfinite(native) and native > 0 else None
        half_frame = 0.5 / native if native else 0.0
        step = 1.0 / fps
        next_time, index, kept = 0.0, -1, 0
        last_time = -math.inf
        while max_frames is None or kept < max_frames:
            if not capture.grab():
                break
            index += 1
            msec = capture.get(cv2.CAP_PROP_POS_MSEC)
            time_s = msec / 1000.0 if math.isfinite(msec) and (msec > 0 or index == 0) else (
                index / native if native else math.nan)
            if not math.isfinite(time_s) or time_s <= last_time:
                # No usable timestamps at all: fall back to the frame number (and say nothing
                # different happened: the frame number IS the clock of such a stream).
                time_s = index / native if native else float(index)
            last_time = time_s
            if time_s + half_frame < next_time:
                continue
            ok, bgr = capture.retrieve()
            if not ok or bgr is None:
                raise InputError(f"{p}: frame {index} could not be decoded; the video is corrupt from there on")
            kept += 1
            next_time = max(next_time + step, time_s + step - half_frame)
            yield VideoFrame(image=np.ascontiguousarray(bgr[:, :, ::-1]), time_s=float(time_s), index=index)
        if kept == 0:
            raise InputError(f"{p}: no decodable video frame; the file is empty or corrupt")
    finally:
        capture.release()


def video_order(frames: Sequence[VideoFrame]) -> FrameOrder:
    """A :class:`FrameOrder` for frames sampled from one video (times relative to the first)."""
    if not frames:
        raise InputError("no video frames to order")
    t0 = frames[0].time_s
    return FrameOrder([TimedFrame(time_s=f.time_s - t0, index=f.index) for f in frames], "video", 0.0)
