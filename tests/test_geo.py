"""Geodesy helpers: geodesic distances, CRS round trips, UTM zones, metric offsets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import CRS, Transformer

from cvgl.geo import crs_key, from_latlon, geodesic_distance_m, offset_latlon, to_latlon, utm_crs_for

lats = st.floats(min_value=-89.0, max_value=89.0, allow_nan=False)
lons = st.floats(min_value=-180.0, max_value=180.0, allow_nan=False)
offsets = st.floats(min_value=-7000.0, max_value=7000.0, allow_nan=False)

FAST = settings(max_examples=150, deadline=None)


def test_one_degree_of_latitude_at_equator() -> None:
    assert geodesic_distance_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(110574.0, abs=1.0)


def test_one_degree_of_longitude_at_equator() -> None:
    # Equatorial circumference / 360 on WGS84: 2*pi*6378137/360.
    assert geodesic_distance_m(0.0, 10.0, 0.0, 11.0) == pytest.approx(111319.49, abs=0.01)


@FAST
@given(lats, lons, lats, lons)
def test_distance_is_symmetric(lat1: float, lon1: float, lat2: float, lon2: float) -> None:
    d12 = geodesic_distance_m(lat1, lon1, lat2, lon2)
    d21 = geodesic_distance_m(lat2, lon2, lat1, lon1)
    assert isinstance(d12, float)
    assert d12 >= 0.0
    assert d12 == pytest.approx(d21, rel=1e-9, abs=1e-6)


@FAST
@given(lats, lons)
def test_distance_is_zero_on_identity(lat: float, lon: float) -> None:
    assert geodesic_distance_m(lat, lon, lat, lon) == pytest.approx(0.0, abs=1e-6)


@FAST
@given(st.floats(min_value=-80.0, max_value=80.0), lons, offsets, offsets)
def test_offset_then_distance_matches_metric_length(
    lat: float, lon: float, east: float, north: float
) -> None:
    lat2, lon2 = offset_latlon(lat, lon, east, north)
    expected = math.hypot(east, north)
    got = geodesic_distance_m(lat, lon, lat2, lon2)
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-6)


@FAST
@given(
    st.floats(min_value=-80.0, max_value=80.0),
    lons,
    st.floats(min_value=1.0, max_value=5000.0),
)
def test_offset_direction(lat: float, lon: float, dist: float) -> None:
    north_lat, north_lon = offset_latlon(lat, lon, 0.0, dist)
    assert north_lat > lat
    assert abs((north_lon - lon + 540.0) % 360.0 - 180.0) < 1e-9
    east_lat, east_lon = offset_latlon(lat, lon, dist, 0.0)
    delta_lon = (east_lon - lon + 540.0) % 360.0 - 180.0
    assert delta_lon > 0


@st.composite
def utm_points(draw: st.DrawFn) -> tuple[int, float, float]:
    zone = draw(st.integers(min_value=1, max_value=60))
    south = draw(st.booleans())
    lat = draw(st.floats(min_value=-79.5, max_value=-0.01)) if south else draw(
        st.floats(min_value=0.0, max_value=83.5)
    )
    central = -183.0 + 6.0 * zone
    lon = central + draw(st.floats(min_value=-3.0, max_value=3.0))
    return (32700 if south else 32600) + zone, lat, lon


@FAST
@given(utm_points())
def test_utm_round_trip_is_sub_micrometre(point: tuple[int, float, float]) -> None:
    epsg, lat, lon = point
    x, y = from_latlon(epsg, lat, lon)
    lat2, lon2 = to_latlon(epsg, x, y)
    assert geodesic_distance_m(lat, lon, lat2, lon2) < 1e-6
    x2, y2 = from_latlon(epsg, lat2, lon2)
    assert abs(x2 - x) < 1e-6 and abs(y2 - y) < 1e-6


@FAST
@given(
    st.integers(min_value=1, max_value=60),
    st.floats(min_value=200_000.0, max_value=800_000.0),
    st.floats(min_value=100_000.0, max_value=9_000_000.0),
)
def test_utm_round_trip_from_projected(zone: int, x: float, y: float) -> None:
    epsg = 32600 + zone
    lat, lon = to_latlon(epsg, x, y)
    x2, y2 = from_latlon(epsg, lat, lon)
    assert abs(x2 - x) < 1e-6 and abs(y2 - y) < 1e-6


def test_to_latlon_matches_pyproj_and_accepts_every_crs_form() -> None:
    ref = Transformer.from_crs(32613, 4326, always_xy=True)
    lon_ref, lat_ref = ref.transform(488000.0, 4443000.0)
    rasterio_crs = pytest.importorskip("rasterio.crs").CRS.from_epsg(32613)
    for crs in (32613, "EPSG:32613", CRS.from_epsg(32613), rasterio_crs):
        lat, lon = to_latlon(crs, 488000.0, 4443000.0)
        assert lat == pytest.approx(lat_ref, abs=1e-12)
        assert lon == pytest.approx(lon_ref, abs=1e-12)
    assert crs_key(rasterio_crs) == "EPSG:32613"


def test_geographic_crs_is_lon_lat_in_x_y() -> None:
    lat, lon = to_latlon(4326, -105.1, 40.1)
    assert (lat, lon) == pytest.approx((40.1, -105.1))
    x, y = from_latlon("EPSG:4326", 40.1, -105.1)
    assert (x, y) == pytest.approx((-105.1, 40.1))


def test_vectorised_broadcasting() -> None:
    lat1 = np.array([[0.0], [10.0], [20.0]])
    lon2 = np.array([0.0, 1.0, 2.0, 3.0])
    d = geodesic_distance_m(lat1, 0.0, lat1, lon2)
    assert isinstance(d, np.ndarray) and d.shape == (3, 4)
    assert np.all(d[:, 0] == 0.0)
    assert np.all(np.diff(d[:, 1]) < 0)  # a degree of longitude shrinks away from the equator
    lat, lon = offset_latlon(np.zeros((2, 3)), 0.0, 100.0, 0.0)
    assert lat.shape == (2, 3) and lon.shape == (2, 3)
    x, y = from_latlon(32613, [40.0, 40.1], [-105.0, -105.1])
    assert x.shape == (2,) and y.shape == (2,)
    assert geodesic_distance_m([], [], [], []).shape == (0,)


@pytest.mark.parametrize(
    ("lat", "lon", "epsg"),
    [
        (40.14, -105.14, 32613),  # Longmont, Colorado
        (-33.87, 151.21, 32756),  # Sydney
        (51.5, -0.12, 32630),  # London
        (60.39, 5.32, 32632),  # Bergen: south-west Norway exception
        (78.2, 15.6, 32633),  # Svalbard exception
        (0.0, 180.0, 32660),
        (0.0, -180.0, 32601),
    ],
)
def test_utm_crs_for(lat: float, lon: float, epsg: int) -> None:
    assert utm_crs_for(lat, lon) == epsg


def test_utm_crs_for_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        utm_crs_for(91.0, 0.0)
