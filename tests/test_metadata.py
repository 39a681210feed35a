"""Camera metadata: EXIF GPS/focal + DJI XMP, read from JPEG/PNG/TIFF, and written round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, PngImagePlugin
from PIL.TiffImagePlugin import IFDRational

from cvgl.data.metadata import (
    CameraMetadata,
    build_dji_xmp,
    read_camera_metadata,
    write_camera_metadata,
)
from cvgl.errors import InputError

ATTRIBUTE_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="DJI Meta Data"
    xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
    drone-dji:AbsoluteAltitude="+312.45"
    drone-dji:RelativeAltitude="+80.20"
    drone-dji:GimbalRollDegree="+0.00"
    drone-dji:GimbalYawDegree="+12.30"
    drone-dji:GimbalPitchDegree="-45.10"
    drone-dji:FlightYawDegree="-170.5"/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""

ELEMENT_XMP = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/">
   <drone-dji:RelativeAltitude>+80.20</drone-dji:RelativeAltitude>
   <drone-dji:GimbalYawDegree>12.3</drone-dji:GimbalYawDegree>
   <drone-dji:GimbalPitchDegree> -45.10 </drone-dji:GimbalPitchDegree>
   <drone-dji:FlightYawDegree>+190.5</drone-dji:FlightYawDegree>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>"""


def _gps_exif(lat_ref: str, lat: tuple, lon_ref: str, lon: tuple, alt: float | None = None,
              below_sea: bool = False) -> bytes:
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update({1: lat_ref, 2: tuple(IFDRational(*part) for part in lat),
                3: lon_ref, 4: tuple(IFDRational(*part) for part in lon)})
    if alt is not None:
        gps[5] = b"\x01" if below_sea else b"\x00"
        gps[6] = IFDRational(round(alt * 100), 100)
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[0x920A] = IFDRational(45, 10)
    sub[0xA405] = 24
    return exif.tobytes()


# --------------------------------------------------------------------------- reading


def test_plain_image_has_only_size(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (30, 20)).save(path)
    meta = read_camera_metadata(path)
    assert (meta.width, meta.height) == (30, 20)
    assert meta == CameraMetadata(width=30, height=20)
    assert meta.heading_deg is None and meta.pitch_from_nadir_deg is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_exif_gps_south_west_below_sea(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"gps.{fmt.lower()}"
    exif = _gps_exif("S", ((33, 1), (52, 1), (1234567, 100000)),
                     "W", ((70, 1), (30, 1), (0, 1)), alt=12.5, below_sea=True)
    Image.new("RGB", (8, 6)).save(path, fmt, exif=exif)
    meta = read_camera_metadata(path)
    assert meta.gps_lat == pytest.approx(-(33 + 52 / 60 + 12.34567 / 3600), abs=1e-9)
    assert meta.gps_lon == pytest.approx(-70.5, abs=1e-9)
    assert meta.gps_alt == pytest.approx(-12.5)
    assert meta.focal_length_mm == pytest.approx(4.5)
    assert meta.focal_length_35mm == 24


def test_zero_gps_means_no_fix(tmp_path: Path) -> None:
    path = tmp_path / "nofix.jpg"
    Image.new("RGB", (8, 8)).save(path, exif=_gps_exif("N", ((0, 1),) * 3, "E", ((0, 1),) * 3))
    meta = read_camera_metadata(path)
    assert meta.gps_lat is None and meta.gps_lon is None


def test_orientation_swaps_reported_size(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    meta = read_camera_metadata(path)
    assert (meta.width, meta.height) == (20, 30)


def _assert_dji_values(meta: CameraMetadata, flight_yaw: float) -> None:
    assert meta.relative_altitude_m == pytest.approx(80.2)
    assert meta.gimbal_yaw_deg == pytest.approx(12.3)
    assert meta.gimbal_pitch_deg == pytest.approx(-45.1)
    assert meta.flight_yaw_deg == pytest.approx(flight_yaw)
    assert meta.heading_deg == pytest.approx(12.3)
    assert meta.pitch_from_nadir_deg == pytest.approx(44.9)


@pytest.mark.parametrize(("packet", "flight_yaw"), [(ATTRIBUTE_XMP, -170.5), (ELEMENT_XMP, 190.5)])
def test_dji_xmp_in_jpeg(tmp_path: Path, packet: str, flight_yaw: float) -> None:
    path = tmp_path / "dji.jpg"
    Image.new("RGB", (8, 8)).save(path, xmp=packet.encode())
    _assert_dji_values(read_camera_metadata(path), flight_yaw)


def test_dji_xmp_in_png_itxt(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", ELEMENT_XMP)
    path = tmp_path / "dji.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    _assert_dji_values(read_camera_metadata(path), 190.5)


def test_dji_xmp_in_tiff_tag(tmp_path: Path) -> None:
    path = tmp_path / "dji.tif"
    Image.new("RGB", (8, 8)).save(path, tiffinfo={700: ATTRIBUTE_XMP.encode()})
    meta = read_camera_metadata(path)
    _assert_dji_values(meta, -170.5)
    assert meta.gps_alt == pytest.approx(312.45)  # XMP AbsoluteAltitude fills the EXIF gap
    assert meta.gps_lat is None


def test_xmp_found_by_raw_scan(tmp_path: Path) -> None:
    # XMP tucked into a JPEG comment segment: Pillow does not expose it as XMP.
    path = tmp_path / "comment.jpg"
    Image.new("RGB", (8, 8)).save(path, comment=ATTRIBUTE_XMP.encode())
    with Image.open(path) as img:
        assert "xmp" not in img.info
    _assert_dji_values(read_camera_metadata(path), -170.5)


def test_custom_dji_prefix_and_single_quotes(tmp_path: Path) -> None:
    packet = ("<x:xmpmeta><rdf:Description xmlns:dji='http://www.dji.com/drone-dji/1.0/' "
              "dji:GimbalYawDegree='+271.5' dji:GimbalPitchDegree='-90.0'/></x:xmpmeta>")
    path = tmp_path / "prefix.jpg"
    Image.new("RGB", (8, 8)).save(path, xmp=packet.encode())
    meta = read_camera_metadata(path)
    assert meta.gimbal_yaw_deg == 271.5
    assert meta.pitch_from_nadir_deg == 0.0


def test_xmp_position_is_a_fallback(tmp_path: Path) -> None:
    packet = ('<x:xmpmeta><rdf:Description xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" '
              'drone-dji:GpsLatitude="+47.1" drone-dji:GpsLongtitude="+8.5" '
              'drone-dji:AbsoluteAltitude="+500.0"/></x:xmpmeta>')
    path = tmp_path / "xmpgps.jpg"
    Image.new("RGB", (8, 8)).save(path, xmp=packet.encode())
    meta = read_camera_metadata(path)
    assert (meta.gps_lat, meta.gps_lon, meta.gps_alt) == (47.1, 8.5, 500.0)

    both = tmp_path / "both.jpg"
    exif = _gps_exif("N", ((10, 1), (0, 1), (0, 1)), "E", ((20, 1), (0, 1), (0, 1)))
    Image.new("RGB", (8, 8)).save(both, xmp=packet.encode(), exif=exif)
    meta = read_camera_metadata(both)
    assert (meta.gps_lat, meta.gps_lon) == (10.0, 20.0)


def test_garbage_xmp_values_are_none(tmp_path: Path) -> None:
    packet = ('<x:xmpmeta drone-dji:GimbalYawDegree="north" drone-dji:GimbalPitchDegree="nan"'
              ' drone-dji:FlightYawDegree="+33.0"/>')
    path = tmp_path / "garbage.jpg"
    Image.new("RGB", (8, 8)).save(path, xmp=packet.encode())
    meta = read_camera_metadata(path)
    assert meta.gimbal_yaw_deg is None and meta.gimbal_pitch_deg is None
    assert meta.heading_deg == 33.0  # falls back to flight yaw


def test_heading_wraps_to_0_360() -> None:
    assert CameraMetadata(gimbal_yaw_deg=-90.0).heading_deg == 270.0
    assert CameraMetadata(flight_yaw_deg=370.0).heading_deg == pytest.approx(10.0)
    assert CameraMetadata(gimbal_pitch_deg=-45.0).pitch_from_nadir_deg == 45.0


def test_float_tiff_metadata_without_pillow_decoder(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    path = tmp_path / "rgbf.tif"
    assert cv2.imwrite(str(path), np.zeros((6, 10, 3), np.float32))
    meta = read_camera_metadata(path)
    assert (meta.width, meta.height) == (10, 6)


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_unreadable_file_raises_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match="broken.jpg"):
        read_camera_metadata(path)


def test_missing_file_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ghost.jpg"):
        read_camera_metadata(tmp_path / "ghost.jpg")


# --------------------------------------------------------------------------- writing


def test_write_then_read_everything(tmp_path: Path) -> None:
    meta = CameraMetadata(gps_lat=-33.8568, gps_lon=151.2153, gps_alt=-3.25,
                          relative_altitude_m=120.0, gimbal_pitch_deg=-60.0, gimbal_yaw_deg=-170.25,
                          flight_yaw_deg=15.0, focal_length_mm=8.8, focal_length_35mm=24.0)
    path = tmp_path / "synthetic.jpg"
    write_camera_metadata(Image.new("RGBA", (40, 30)), path, meta)
    back = read_camera_metadata(path)
    expected = CameraMetadata(**{**meta.__dict__, "width": 40, "height": 30})
    for name, value in expected.__dict__.items():
        assert getattr(back, name) == pytest.approx(value, abs=1e-9), name
    assert back.heading_deg == pytest.approx(189.75)
    assert back.pitch_from_nadir_deg == pytest.approx(30.0)
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic.jpg"]  # no temp file left


def test_write_without_metadata_has_no_xmp(tmp_path: Path) -> None:
    assert build_dji_xmp(CameraMetadata()) is None
    path = tmp_path / "bare.jpg"
    write_camera_metadata(Image.new("L", (8, 8)), path, CameraMetadata())
    assert read_camera_metadata(path) == CameraMetadata(width=8, height=8)


def test_write_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "again.jpg"
    path.write_bytes(b"old")
    write_camera_metadata(Image.new("RGB", (8, 8)), path, CameraMetadata(gimbal_yaw_deg=5.0))
    assert read_camera_metadata(path).gimbal_yaw_deg == 5.0


def test_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="out.jpg"):
        write_camera_metadata(Image.new("RGB", (8, 8)), tmp_path / "no" / "out.jpg",
                              CameraMetadata())


def test_xmp_numbers_look_like_dji() -> None:
    packet = build_dji_xmp(CameraMetadata(gimbal_yaw_deg=12.3, gimbal_pitch_deg=-90.0))
    assert packet is not None
    text = packet.decode()
    assert 'drone-dji:GimbalYawDegree="+12.30"' in text
    assert 'drone-dji:GimbalPitchDegree="-90.00"' in text


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lat=st.floats(-90.0, 90.0),
    lon=st.floats(-180.0, 180.0),
    alt=st.none() | st.floats(-430.0, 8848.0),
    yaw=st.floats(-180.0, 180.0),
    pitch=st.floats(-90.0, 30.0),
    flight_yaw=st.none() | st.floats(-180.0, 180.0),
)
def test_round_trip_property(tmp_path: Path, lat: float, lon: float, alt: float | None,
                             yaw: float, pitch: float, flight_yaw: float | None) -> None:
    assume(abs(lat) > 1e-6 or abs(lon) > 1e-6)  # (0, 0) is read as "no GPS fix" by design
    meta = CameraMetadata(gps_lat=lat, gps_lon=lon, gps_alt=alt, gimbal_yaw_deg=yaw,
                          gimbal_pitch_deg=pitch, flight_yaw_deg=flight_yaw)
    path = tmp_path / "prop.jpg"
    write_camera_metadata(Image.new("RGB", (4, 4)), path, meta)
    back = read_camera_metadata(path)
    assert back.gps_lat == pytest.approx(lat, abs=1e-8)
    assert back.gps_lon == pytest.approx(lon, abs=1e-8)
    if alt is None:
        assert back.gps_alt is None
    else:
        assert back.gps_alt == pytest.approx(alt, abs=1e-3)
    assert back.gimbal_yaw_deg == pytest.approx(yaw, abs=1e-6)
    assert back.gimbal_pitch_deg == pytest.approx(pitch, abs=1e-6)
    if flight_yaw is None:
        assert back.flight_yaw_deg is None
    else:
        assert back.flight_yaw_deg == pytest.approx(flight_yaw, abs=1e-6)
    assert back.pitch_from_nadir_deg == pytest.approx(90.0 + pitch, abs=1e-6)
