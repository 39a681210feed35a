"""Qdrant vector backend: the same search interface, served by Qdrant, with native geo filters.

Where the collection lives:

* ``CVGL_QDRANT_URL`` unset: qdrant-client's **local mode** (``QdrantClient(path=folder/"qdrant")``),
  so the index folder stays self-contained and is written atomically with the other files;
* ``CVGL_QDRANT_URL`` set (e.g. ``http://localhost:6333``): a real server. Each write creates a
  fresh collection ``cvgl-<uuid>`` named in the manifest, so the previous index keeps answering
  until the folder swap; the folder then holds only the manifest and the other files.

Each point is one tile: id = row of ``tiles.parquet``, vector = the aligned descriptor (dot
product on unit vectors), payload ``{"row", "location": {"lat", "lon"}}``. The geographic prior
is Qdrant's ``GeoRadius`` payload filter on ``location`` (``geo=(lat, lon, radius_m)``).
"""

from __future__ import annotations

import atexit
import os
import uuid
from pathlib import Path

import numpy as np

from cvgl.index.vectors import pad_results

QDRANT_DIR = "qdrant"
URL_ENV = "CVGL_QDRANT_URL"
UPLOAD_BATCH = 2048
_LOCAL_CLIENTS: dict[tuple[str, int], object] = {}  # local storage is single-client: share it


@atexit.register
def _close_local_clients() -> None:
    """Close shared local clients before interpreter shutdown (qdrant's __del__ fails then)."""
    for client in _LOCAL_CLIENTS.values():
        client.close()
    _LOCAL_CLIENTS.clear()


def _server_url() -> str | None:
    return os.environ.get(URL_ENV) or None


def _client(folder: Path | None, reuse: bool = True):
    """A client for the server (``CVGL_QDRANT_URL``) or for local storage under ``folder``."""
    from qdrant_client import QdrantClient

    url = _server_url()
    if url:
        return QdrantClient(url=url)
    if folder is None:
        raise ValueError("Qdrant local mode needs the index folder")
    path = Path(folder) / QDRANT_DIR
    path.mkdir(parents=True, exist_ok=True)
    if not reuse:
        return QdrantClient(path=str(path))
    key = (str(path.resolve()), path.stat().st_ino)  # a replaced index folder is a new key
    if key not in _LOCAL_CLIENTS:
        _LOCAL_CLIENTS[key] = QdrantClient(path=str(path))
    return _LOCAL_CLIENTS[key]


class QdrantBackend:
    """One Qdrant collection of aligned tile descriptors with their locations."""

    kind = "qdrant"
    native_geo = True

    def __init__(self, client, collection: str, count: int, params: dict | None = None) -> None:
        self.client = client
        self.collection = collection
        self.count = int(count)
        self.params = dict(params or {})

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        return {"type": self.kind, "collection": self.collection, "server": bool(_server_url()), **self.params}

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path | None = None, lat: np.ndarray | None = None,
              lon: np.ndarray | None = None, **_: object) -> QdrantBackend:
        """Create and fill a new collection. ``lat``/``lon`` per row enable the geo filter."""
        from qdrant_client import models

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        collection = f"cvgl-{uuid.uuid4().hex[:12]}" if _server_url() else "tiles"
        client = _client(folder, reuse=False)
        client.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT))
        if lat is not None and lon is not None:
            payload = ({"row": i, "location": {"lat": float(a), "lon": float(o)}} for i, (a, o) in enumerate(zip(lat, lon)))
            if _server_url():
                client.create_payload_index(collection, "location", models.PayloadSchemaType.GEO)
        else:
            payload = ({"row": i} for i in range(n))
        client.upload_collection(collection, vectors=vectors, payload=payload, ids=range(n),
                                 batch_size=UPLOAD_BATCH, wait=True)
        backend = cls(client, collection, n, {"dim": dim, "distance": "dot"})
        if not _server_url():
            client.close()  # release the storage lock so the folder can be renamed into place
            backend.client = None
        return backend

    def save(self, folder: Path) -> None:
        """Nothing to copy: local mode was built inside ``folder``; a server keeps its collection."""

    @classmethod
    def open(cls, folder: Path, mmap: bool = False, params: dict | None = None, vectors=None) -> QdrantBackend:
        params = dict(params or {})
        client = _client(folder)
        collection = params.pop("collection", "tiles")
        params.pop("type", None)
        params.pop("server", None)
        count = client.count(collection, exact=True).count
        return cls(client, collection, count, params)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        from qdrant_client import models

        if self.client is None:
            raise RuntimeError("this Qdrant backend was built for saving; open the index to search it")
        conditions: list = []
        if geo is not None:
            lat, lon, radius_m = geo
            conditions.append(models.FieldCondition(
                key="location", geo_radius=models.GeoRadius(center=models.GeoPoint(lat=float(lat), lon=float(lon)),
                                                            radius=float(radius_m))))
        if allowed is not None:
            conditions.append(models.HasIdCondition(has_id=[int(i) for i in np.unique(allowed)]))
        query_filter = models.Filter(must=conditions) if conditions else None
        queries = np.asarray(queries, dtype=np.float32)
        requests = [models.QueryRequest(query=q.tolist(), limit=int(k), filter=query_filter, with_payload=False)
                    for q in queries]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for i, response in enumerate(responses):
            for j, point in enumerate(response.points[:k]):
                scores[i, j], rows[i, j] = point.score, int(point.id)
        return pad_results(scores, rows, k)
