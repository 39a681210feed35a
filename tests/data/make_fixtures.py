"""Write tiny fixture trees in each benchmark's published layout (random pixels, few images).

Tests call these functions on a tmp folder; ``python tests/data/make_fixtures.py OUT`` writes all
of them into ``OUT/<dataset>`` for a look by hand. Each function returns the dataset root, and
module constants say how many items each split holds so tests can check counts.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PANO_SIZE = (32, 64)  # H, W of street panoramas
AERIAL_SIZE = (32, 32)  # H, W of satellite and drone images

CVUSA_COUNTS = {"train": 4, "val": 3}
CVACT_IDS = ["__-DFIFxvZBCn1873qkqXA", "-0R1LNbX5JRO0A8Dsj_wgA", "-1FXPuBS0dwN5lsS0gYfaw",
             "-2_pVM1BkElB8Ev9YzJ6BQ", "-3VTkL5hwKlKyKMz3Xkpqg", "-4fLFHWSo4RQB8WhFWAGGQ"]
CVACT_TRAIN_IND = [1, 3, 4, 6]  # 1-based, as in MATLAB
CVACT_VAL_IND = [2, 5]
CVACT_UTM_ORIGIN = (692_000.0, 6_090_000.0)  # easting, northing in Canberra (zone 55S)
VIGOR_CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
VIGOR_SATS_PER_CITY = 5
VIGOR_PANOS = {"train": 2, "test": 2}  # per city and same-area split; cross-area labels hold both
UNIVERSITY_BUILDINGS = {"train": [0, 7, 12], "test": [3, 5]}
UNIVERSITY_DISTRACTOR = 9  # a gallery-only building in test
UNIVERSITY_DRONE_PER_BUILDING = 3


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def make_cvusa(root: Path) -> Path:
    """``splits/{train,val}-19zl.csv`` + ``bingmap/19`` and ``streetview/panos`` images."""
    root = Path(root)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    number = 0  # file 0000000 exists: id 0 is an ordinary id
    for split, count in CVUSA_COUNTS.items():
        lines = []
        for _ in range(count):
            stem = f"{number:07d}"
            sat = f"bingmap/19/{stem}.jpg"
            pano = f"streetview/panos/{stem}.jpg"
            _write_image(root / sat, AERIAL_SIZE, number)
            _write_image(root / pano, PANO_SIZE, 1000 + number)
            lines.append(f"{sat},{pano},streetview/annotations/{stem}.png\n")
            number += 1
        (root / "splits" / f"{split}-19zl.csv").write_text("".join(lines))
    return root


def make_cvact(root: Path) -> Path:
    """``ACT_data.mat`` (panoIds, utm, trainSet.trainInd, valSet.valInd) + ``ANU_data_small`` images."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    e0, n0 = CVACT_UTM_ORIGIN
    utm = np.array([[e0 + 100.0 * i, n0 + 50.0 * i] for i in range(len(CVACT_IDS))])
    savemat(
        root / "ACT_data.mat",
        {
            "panoIds": np.array(CVACT_IDS, dtype=object),
            "utm": utm,
            "trainSet": {"trainNum": len(CVACT_TRAIN_IND), "trainInd": np.array(CVACT_TRAIN_IND, dtype=np.float64)},
            "valSet": {"valNum": len(CVACT_VAL_IND), "valInd": np.array(CVACT_VAL_IND, dtype=np.float64)},
        },
    )
    for i, pano_id in enumerate(CVACT_IDS):
        _write_image(root / "ANU_data_small" / "streetview" / f"{pano_id}_grdView.jpg", PANO_SIZE, i)
        _write_image(root / "ANU_data_small" / "satview_polish" / f"{pano_id}_satView_polish.jpg", AERIAL_SIZE, 100 + i)
    return root


def vigor_sat_name(city_index: int, k: int) -> str:
    return f"satellite_{41.0 + city_index + 0.001 * k:.6f}_{-87.0 - city_index - 0.001 * k:.6f}.png"


def make_vigor(root: Path) -> Path:
    """``{city}/panorama``, ``{city}/satellite`` and ``splits/{city}`` label files for four cities.

    In each city, same-area train panorama ``j`` has positive tile ``j`` and test panorama ``j``
    has positive tile ``j + 2``; semi-positives are the next three tiles (mod 5). The
    cross-area file ``pano_label_balanced.txt`` lists the train then the test panoramas.
    """
    root = Path(root)
    seed = 0
    for c, city in enumerate(VIGOR_CITIES):
        sats = [vigor_sat_name(c, k) for k in range(VIGOR_SATS_PER_CITY)]
        for name in sats:
            _write_image(root / city / "satellite" / name, AERIAL_SIZE, seed)
            seed += 1
        labels: dict[str, list[str]] = {}
        for split, offset in (("train", 0), ("test", 2)):
            lines = []
            for j in range(VIGOR_PANOS[split]):
                lat, lon = 41.0 + c + 0.0001 * (j + offset), -87.0 - c - 0.0001 * (j + offset)
                pano = f"{split}{j}_pano,{lat:.6f},{lon:.6f},.jpg"
                _write_image(root / city / "panorama" / pano, PANO_SIZE, seed)
                seed += 1
                picks = [sats[(j + offset + s) % VIGOR_SATS_PER_CITY] for s in range(4)]
                fields = [pano] + [f"{name} {1.5 * s:.2f} {-2.0 * s:.2f}" for s, name in enumerate(picks)]
                lines.append(" ".join(fields) + "\n")
            labels[split] = lines
        split_dir = root / "splits" / city
        split_dir.mkdir(parents=True, exist_ok=True)
        for split, lines in labels.items():
            (split_dir / f"same_area_balanced_{split}.txt").write_text("".join(lines))
        (split_dir / "pano_label_balanced.txt").write_text("".join(labels["train"] + labels["test"]))
        (split_dir / "satellite_list.txt").write_text("".join(f"{s}\n" for s in sats))
    return root


def make_university1652(root: Path) -> Path:
    """``train/{drone,street,satellite}/{id}`` and ``test/{query,gallery}_{view}/{id}`` images.

    Every building has one satellite image, ``UNIVERSITY_DRONE_PER_BUILDING`` drone images and
    one street image (building 12 in train has none: some real buildings lack street views). The
    test galleries also hold a distractor building no query shows.
    """
    root = Path(root)
    seed = 0

    def put(folder: Path, building: int, count: int, ext: str = ".jpg") -> None:
        nonlocal seed
        for k in range(count):
            _write_image(folder / f"{building:04d}" / f"image-{k:02d}{ext}", AERIAL_SIZE, seed)
            seed += 1

    train = root / "train"
    for b in UNIVERSITY_BUILDINGS["train"]:
        put(train / "satellite", b, 1)
        put(train / "drone", b, UNIVERSITY_DRONE_PER_BUILDING, ".jpeg")
        if b != 12:
            put(train / "street", b, 1)
    test = root / "test"
    for b in UNIVERSITY_BUILDINGS["test"]:
        put(test / "query_drone", b, UNIVERSITY_DRONE_PER_BUILDING)
        put(test / "query_satellite", b, 1, ".png")
        put(test / "query_street", b, 1)
    for b in UNIVERSITY_BUILDINGS["test"] + [UNIVERSITY_DISTRACTOR]:
        put(test / "gallery_satellite", b, 1, ".png")
        put(test / "gallery_drone", b, UNIVERSITY_DRONE_PER_BUILDING)
        put(test / "gallery_street", b, 1)
    return root


PAIRS_ROWS = [  # query, reference, lat, lon (reference r1 is shared by two queries)
    ("q/a.jpg", "r/r0.png", "40.1001", "-105.1001"),
    ("q/b.jpg", "r/r1.png", "40.1002", "-105.1002"),
    ("q/c.jpg", "r/r1.png", "40.1002", "-105.1002"),
    ("q/d.jpg", "r/r2.png", "", ""),
]


def make_pairs_csv(root: Path) -> Path:
    """A ``pairs.csv`` with paths relative to it; returns the CSV path (not the folder)."""
    root = Path(root)
    for i, (query, reference, _, _) in enumerate(PAIRS_ROWS):
        _write_image(root / query, AERIAL_SIZE, i)
        if not (root / reference).exists():
            _write_image(root / reference, AERIAL_SIZE, 100 + i)
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Query", "Reference", "lat", "lon", "note"])
        writer.writerows([*row, "x"] for row in PAIRS_ROWS)
    return root / "pairs.csv"


MAKERS = {
    "cvusa": make_cvusa,
    "cvact": make_cvact,
    "vigor": make_vigor,
    "university1652": make_university1652,
    "pairs": make_pairs_csv,
}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/make_fixtures.py OUT_FOLDER")
    out = Path(sys.argv[1])
    for name, make in MAKERS.items():
        print(make(out / name))
