"""Reference indexes: build (encode a source) and store (faiss + Parquet + manifest)."""
