"""Tokenization pipeline: audio corpus on fsspec storage → Parquet datasets of Mimi codes, on Ray."""
