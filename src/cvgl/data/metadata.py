"""What the camera knows: GPS, altitude, gimbal angles and focal length of a photo.

Cross-view localisation gets much easier when the photo says roughly where it was taken, which
way the camera faced and how steeply it looked down: the heading lets us rotate the photo
north-up and the pitch lets us undo the perspective (see :mod:`cvgl.data.geometry`). That
information lives in two places:

* EXIF: GPS position (degrees/minutes/seconds rationals plus N/S/E/W references), altitude,
  and focal lengths. Every camera writes these.
* DJI's XMP packet: ``drone-dji:GimbalYawDegree``, ``GimbalPitchDegree``, ``FlightYawDegree``,
  ``RelativeAltitude``... written either as attributes (``drone-dji:GimbalYawDegree="+12.30"``)
  or as elements (``<drone-dji:GimbalYawDegree>12.3</drone-dji:GimbalYawDegree>``). We parse the
  raw packet with regular expressions rather than an XML parser because real packets are often
  not well-formed (NUL padding, truncated APP1 segments, odd namespace prefixes).

Missing or malformed metadata is normal and yields ``None`` fields; only a file that is not a
readable image raises :class:`~cvgl.errors.InputError`. A value that parses but cannot be true (a
yaw of 1e308 degrees, a drone 100 km above ground, a 0.001 mm lens; see :data:`PLAUSIBLE`) is
treated as unknown too, with one warning line naming the file, the field and the value: metadata
we cannot trust must not rotate or rescale a photo into a confident wrong answer, and a photo
with unknown heading or altitude is still located (by searching them).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.TiffImagePlugin import IFDRational

from cvgl.data.images import open_image
from cvgl.errors import InputError
from cvgl.io import write_bytes_atomic

DJI_NAMESPACE = "http://www.dji.com/drone-dji/1.0/"
log = logging.getLogger(__name__)

#: Ranges outside which a recorded value is nonsense and treated as unknown (with a warning).
#: Yaws: DJI writes -180..180, other writers 0..360. Pitch: -90 is nadir, +90 straight up.
#: Altitude above the take-off point: no drone flies 10 km up. 35 mm focal lengths: a fisheye
#: (about 8 mm) to a 2000 mm telephoto.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "GimbalYawDegree": (-360.0, 360.0),
    "FlightYawDegree": (-360.0, 360.0),
    "GimbalPitchDegree": (-180.0, 180.0),
    "RelativeAltitude": (-10_000.0, 10_000.0),
    "AbsoluteAltitude": (-1_000.0, 100_000.0),
    "FocalLength": (0.5, 2000.0),
    "FocalLengthIn35mmFilm": (4.0, 2000.0),
}

_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_ALT_REF, _GPS_ALT = 1, 2, 3, 4, 5, 6
_GPS_VERSION_ID = 0
_TAG_ORIENTATION = 0x0112
_TAG_XMP = 700
_TAG_FOCAL_LENGTH = 0x920A
_TAG_FOCAL_LENGTH_35MM = 0xA405
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_MICRO_ARCSEC_PER_DEG = 3600 * 1_000_000
_RAW_XMP_SCAN_BYTES = 4 * 1024 * 1024
_XMP_START, _XMP_END = b"<x:xmpmeta", b"</x:xmpmeta>"


@dataclass
class CameraMetadata:
    """Camera pose and optics as recorded in a photo; every field is None when unknown.

    Angles are in degrees. ``gimbal_pitch_deg`` follows DJI: 0 = level with the horizon,
    -90 = looking straight down (nadir). Yaws are clockwise from true north. ``width`` and
    ``height`` are of the image as displayed (EXIF orientation applied), i.e. the size
    :func:`cvgl.data.images.load_image` returns, so intrinsics derived from them match its pixels.
    """

    gps_lat: float | None = None
    gps_lon: float | None = None
    gps_alt: float | None = None
    relative_altitude_m: float | None = None
    gimbal_pitch_deg: float | None = None
    gimbal_yaw_deg: float | None = None
    flight_yaw_deg: float | None = None
    focal_length_mm: float | None = None
    focal_length_35mm: float | None = None
    width: int | None = None
    height: int | None = None

    @property
    def heading_deg(self) -> float | None:
        """Direction the camera faced, clockwise from north in [0, 360).

        The gimbal yaw is preferred because the gimbal can point away from the aircraft's nose;
        the flight yaw is the fallback for cameras fixed to the airframe.
        """
        yaw = self.gimbal_yaw_deg if self.gimbal_yaw_deg is not None else self.flight_yaw_deg
        if yaw is None:
            return None
        heading = yaw % 360.0
        return 0.0 if heading >= 360.0 else heading  # -1e-300 % 360 rounds to 360.0

    @property
    def pitch_from_nadir_deg(self) -> float | None:
        """Tilt away from straight down: 0 = nadir (gimbal -90), 45 = oblique, 90 = horizon."""
        return None if self.gimbal_pitch_deg is None else 90.0 + self.gimbal_pitch_deg


@dataclass
class _RawMetadata:
    """The metadata sources of one file, gathered before interpretation."""

    width: int
    height: int
    ifd0: dict[int, Any] = field(default_factory=dict)
    exif_ifd: dict[int, Any] = field(default_factory=dict)
    gps_ifd: dict[int, Any] = field(default_factory=dict)
    xmp_packets: list[str] = field(default_factory=list)


def read_camera_metadata(path: str | Path) -> CameraMetadata:
    """Read GPS, altitude, gimbal/flight angles and focal lengths from a JPEG, PNG or TIFF.

    EXIF GPS wins over DJI's XMP ``GpsLatitude``/``GpsLongitude`` and ``AbsoluteAltitude``, which
    only fill in what EXIF lacks (position and altitude separately). A GPS position of exactly
    (0, 0) is treated as "no fix" (what cameras write without a lock), not as Null Island.
    """
    p = Path(path)
    raw = _read_raw(p)
    if not any(_DJI_HINT in packet for packet in raw.xmp_packets):
        raw.xmp_packets.extend(_scan_file_for_xmp(p))
    dji = {k: v for k, v in _parse_dji_xmp(raw.xmp_packets).items() if _plausible(p, f"XMP {k}", k, v) is not None}

    lat, lon, alt = _gps_from_exif(raw.gps_ifd)
    if lat is None or lon is None:
        lat, lon = _valid_position(dji.get("GpsLatitude"),
                                   dji.get("GpsLongitude", dji.get("GpsLongtitude")))
    alt = _plausible(p, "EXIF GPSAltitude", "AbsoluteAltitude", alt)
    if alt is None:
        alt = dji.get("AbsoluteAltitude")

    focal = _plausible(p, "EXIF FocalLength", "FocalLength", _positive(_exif_value(raw, _TAG_FOCAL_LENGTH)))
    focal_35 = _plausible(p, "EXIF FocalLengthIn35mmFilm", "FocalLengthIn35mmFilm",
                          _positive(_exif_value(raw, _TAG_FOCAL_LENGTH_35MM)))
    return CameraMetadata(
        gps_lat=lat,
        gps_lon=lon,
        gps_alt=alt,
        relative_altitude_m=dji.get("RelativeAltitude"),
        gimbal_pitch_deg=dji.get("GimbalPitchDegree"),
        gimbal_yaw_deg=dji.get("GimbalYawDegree"),
        flight_yaw_deg=dji.get("FlightYawDegree"),
        focal_length_mm=focal,
        focal_length_35mm=focal_35,
        width=raw.width,
        height=raw.height,
    )


def write_camera_metadata(
    image: Image.Image,
    path: str | Path,
    meta: CameraMetadata,
    quality: int = 92,
) -> None:
    """Save ``image`` as a JPEG carrying ``meta`` as EXIF GPS/focal tags and a DJI-style XMP packet.

    Used to make synthetic drone photos that behave like real ones in every later stage. The file
    is written to a temporary name in the same folder and renamed into place (:mod:`cvgl.io`),
    so a crash never leaves a half-written JPEG that a later run would trip over. ``meta.width``
    and ``meta.height`` are ignored: the image defines its own size. The 35 mm focal length is an
    integer (SHORT) in EXIF, so it is rounded.
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{p}: output folder does not exist; create {folder} first")
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    save_kwargs: dict[str, Any] = {"format": "JPEG", "quality": quality,
                                   "exif": _build_exif(meta).tobytes()}
    xmp = build_dji_xmp(meta)
    if xmp is not None:
        save_kwargs["xmp"] = xmp

    buffer = io.BytesIO()
    rgb.save(buffer, **save_kwargs)
    try:
        write_bytes_atomic(p, buffer.getvalue())
    except OSError as exc:
        raise InputError(f"{p}: cannot write JPEG ({exc.strerror or exc}); "
                         "check the folder is writable and the disk has space") from exc


def build_dji_xmp(meta: CameraMetadata) -> bytes | None:
    """A DJI-style XMP packet (attribute form) for the fields of ``meta`` that are set, or None.

    Values are signed decimals like DJI's (``"+12.30"``) but with up to 9 decimals so a write
    and read round-trips to well below 1e-6 degrees.
    """
    fields = {
        "GpsLatitude": meta.gps_lat,
        "GpsLongitude": meta.gps_lon,
        "AbsoluteAltitude": meta.gps_alt,
        "RelativeAltitude": meta.relative_altitude_m,
        "GimbalPitchDegree": meta.gimbal_pitch_deg,
        "GimbalYawDegree": meta.gimbal_yaw_deg,
        "FlightYawDegree": meta.flight_yaw_deg,
    }
    attrs = "".join(f'\n    drone-dji:{name}="{_xmp_number(value)}"'
                    for name, value in fields.items() if value is not None)
    if not attrs:
        return None
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="DJI Meta Data"\n'
        f'    xmlns:drone-dji="{DJI_NAMESPACE}"{attrs}/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    return packet.encode("utf-8")


# --------------------------------------------------------------------------- reading sources


def _read_raw(p: Path) -> _RawMetadata:
    """Collect size, EXIF IFDs and XMP packets; only an unreadable file raises."""
    try:
        img = open_image(p)
    except InputError as exc:
        if isinstance(exc.__cause__, UnidentifiedImageError):
            raw = _read_raw_tiff(p)  # float / exotic TIFFs Pillow cannot identify
            if raw is not None:
                return raw
        raise
    with img:
        width, height = img.size
        exif = _safe_exif(img)
        raw = _RawMetadata(width=width, height=height)
        if exif is not None:
            raw.ifd0 = dict(exif)
            raw.exif_ifd = _safe_ifd(exif, ExifTags.IFD.Exif)
            raw.gps_ifd = _safe_ifd(exif, ExifTags.IFD.GPSInfo)
        candidates = [img.info.get("xmp"), img.info.get("XML:com.adobe.xmp"),
                      raw.ifd0.get(_TAG_XMP)]
    raw.xmp_packets = [text for text in map(_as_text, candidates) if text]
    if raw.ifd0.get(_TAG_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        raw.width, raw.height = raw.height, raw.width
    return raw


def _read_raw_tiff(p: Path) -> _RawMetadata | None:
    """EXIF of a TIFF whose pixels Pillow cannot decode, read straight from its directories."""
    try:
        with p.open("rb") as fp:
            exif = Image.Exif()
            exif.load_from_fp(fp)
            ifd0 = dict(exif)
            exif_ifd = _safe_ifd(exif, ExifTags.IFD.Exif)
            gps_ifd = _safe_ifd(exif, ExifTags.IFD.GPSInfo)
    except Exception:  # noqa: BLE001 - not a parseable TIFF after all: caller re-raises
        return None
    width, height = ifd0.get(256), ifd0.get(257)
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    xmp = _as_text(ifd0.get(_TAG_XMP))
    return _RawMetadata(width=width, height=height, ifd0=ifd0, exif_ifd=exif_ifd,
                        gps_ifd=gps_ifd, xmp_packets=[xmp] if xmp else [])


def _safe_exif(img: Image.Image) -> Image.Exif | None:
    try:
        return img.getexif()
    except Exception:  # noqa: BLE001 - corrupt EXIF means "no metadata", not "bad image"
        return None


def _safe_ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # noqa: BLE001 - a dangling IFD pointer is common in edited files
        return {}


def _scan_file_for_xmp(p: Path) -> list[str]:
    """Find XMP packets in the raw bytes, for containers whose XMP Pillow does not surface.

    DJI writes the packet near the start of the file, so the first few MB are enough.
    """
    try:
        with p.open("rb") as fp:
            head = fp.read(_RAW_XMP_SCAN_BYTES)
    except OSError:
        return []
    packets = []
    start = head.find(_XMP_START)
    while start != -1:
        end = head.find(_XMP_END, start)
        if end == -1:
            packets.append(head[start:].decode("utf-8", errors="replace"))
            break
        packets.append(head[start:end + len(_XMP_END)].decode("utf-8", errors="replace"))
        start = head.find(_XMP_START, end)
    return packets


def _as_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return None


# --------------------------------------------------------------------------- interpreting


_DJI_HINT = "drone-dji"
_DJI_FIELDS = (
    "GpsLatitude", "GpsLongitude", "GpsLongtitude", "AbsoluteAltitude", "RelativeAltitude",
    "GimbalPitchDegree", "GimbalYawDegree", "FlightYawDegree",
)
_PREFIX_DECL = re.compile(
    r"xmlns:([A-Za-z_][\w.-]*)\s*=\s*[\"']" + re.escape(DJI_NAMESPACE.rstrip("/")) + r"/?[\"']")


def _parse_dji_xmp(packets: Iterable[str]) -> dict[str, float]:
    """Numeric drone-dji fields from XMP packets; the first parseable value of each field wins."""
    values: dict[str, float] = {}
    for packet in packets:
        prefixes = {"drone-dji", *_PREFIX_DECL.findall(packet)}
        for name in _DJI_FIELDS:
            if name in values:
                continue
            for prefix in prefixes:
                value = _find_xmp_number(packet, prefix, name)
                if value is not None:
                    values[name] = value
                    break
    return values


def _find_xmp_number(packet: str, prefix: str, name: str) -> float | None:
    """Value of ``prefix:name`` in attribute or element form, parsed as a float (leading '+' ok)."""
    qname = re.escape(f"{prefix}:{name}")
    attribute = re.search(rf"(?<![\w.:-]){qname}\s*=\s*([\"'])(.*?)\1", packet, re.S)
    if attribute:
        return _parse_number(attribute.group(2))
    element = re.search(rf"<{qname}(?:\s[^>]*)?>([^<]*)</{qname}\s*>", packet)
    if element:
        return _parse_number(element.group(1))
    return None


def _plausible(path: Path, label: str, field_name: str, value: float | None) -> float | None:
    """``value``, or None (with one warning line) when it lies outside :data:`PLAUSIBLE`."""
    if value is None or field_name not in PLAUSIBLE:  # positions are checked by _valid_position
        return value
    low, high = PLAUSIBLE[field_name]
    if low <= value <= high:
        return value
    log.warning("warning: %s: %s %g is outside [%g, %g]; treated as unknown", path, label, value, low, high)
    return None


def _parse_number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _gps_from_exif(gps: Mapping[int, Any]) -> tuple[float | None, float | None, float | None]:
    """(lat, lon, alt) in signed degrees/metres from an EXIF GPS IFD; None where absent or bad."""
    lat = _dms_to_degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), negative_ref="S")
    lon = _dms_to_degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), negative_ref="W")
    lat, lon = _valid_position(lat, lon)
    alt = _to_float(gps.get(_GPS_ALT))
    if alt is not None and _ref_byte(gps.get(_GPS_ALT_REF)) == 1:
        alt = -alt
    return lat, lon, alt


def _valid_position(lat: float | None, lon: float | None) -> tuple[float | None, float | None]:
    """Drop out-of-range positions and the (0, 0) that cameras write when they have no fix."""
    if lat is None or lon is None:
        return None, None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or (lat == 0.0 and lon == 0.0):
        return None, None
    return lat, lon


def _dms_to_degrees(value: Any, ref: Any, negative_ref: str) -> float | None:
    """EXIF (degrees, minutes, seconds) rationals + hemisphere letter -> signed degrees."""
    if value is None:
        return None
    parts = value if isinstance(value, tuple) else (value,)
    numbers = [_to_float(part) for part in parts[:3]]
    if not numbers or any(number is None for number in numbers):
        return None
    degrees = sum(number / 60.0**i for i, number in enumerate(numbers))  # type: ignore[operator]
    ref_text = _as_text(ref) or ""
    if ref_text.strip("\x00 ").upper().startswith(negative_ref):
        degrees = -degrees
    return degrees


def _ref_byte(value: Any) -> int | None:
    """GPSAltitudeRef arrives as b'\\x01', 1 or '1' depending on the writer."""
    if isinstance(value, bytes):
        return value[0] if value else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _to_float(value: Any) -> float | None:
    """Float of an EXIF number or rational; None for missing, 0/0 and non-finite values."""
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2:  # raw (numerator, denominator)
        value = value[0] / value[1] if value[1] else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


def _positive(value: Any) -> float | None:
    """EXIF writes 0 for an unknown focal length; treat it, and nonsense, as missing."""
    number = _to_float(value)
    return number if number is not None and number > 0 else None


def _exif_value(raw: _RawMetadata, tag: int) -> Any:
    """A tag from the Exif sub-IFD, falling back to IFD0 where some TIFF writers put it."""
    value = raw.exif_ifd.get(tag)
    return value if value is not None else raw.ifd0.get(tag)


# --------------------------------------------------------------------------- writing


def _build_exif(meta: CameraMetadata) -> Image.Exif:
    """EXIF with the GPS IFD (DMS rationals + refs) and focal lengths of ``meta``."""
    exif = Image.Exif()
    if meta.gps_lat is not None and meta.gps_lon is not None:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[_GPS_VERSION_ID] = b"\x02\x03\x00\x00"
        gps[_GPS_LAT_REF] = "N" if meta.gps_lat >= 0 else "S"
        gps[_GPS_LAT] = _degrees_to_dms(meta.gps_lat)
        gps[_GPS_LON_REF] = "E" if meta.gps_lon >= 0 else "W"
        gps[_GPS_LON] = _degrees_to_dms(meta.gps_lon)
        if meta.gps_alt is not None:
            gps[_GPS_ALT_REF] = b"\x00" if meta.gps_alt >= 0 else b"\x01"
            gps[_GPS_ALT] = IFDRational(round(abs(meta.gps_alt) * 1000), 1000)
    if meta.focal_length_mm is not None or meta.focal_length_35mm is not None:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        if meta.focal_length_mm is not None:
            sub[_TAG_FOCAL_LENGTH] = IFDRational(round(meta.focal_length_mm * 1000), 1000)
        if meta.focal_length_35mm is not None:
            sub[_TAG_FOCAL_LENGTH_35MM] = int(round(meta.focal_length_35mm))
    return exif


def _degrees_to_dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    """|value| as exact (deg, min, sec) rationals with micro-arcsecond seconds (~3e-11 deg).

    Working in integer micro-arcseconds avoids the classic 59.9999999 -> 60 seconds carry bug.
    """
    total = round(abs(value) * _MICRO_ARCSEC_PER_DEG)
    degrees, rest = divmod(total, _MICRO_ARCSEC_PER_DEG)
    minutes, micro_seconds = divmod(rest, 60 * 1_000_000)
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(micro_seconds, 1_000_000)


def _xmp_number(value: float) -> str:
    """DJI-like signed decimal ("+12.30"), trimmed but with at least two decimals."""
    whole, fraction = f"{value:+.9f}".split(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


