"""Data layer: one schema, two shard formats (WebDataset, MDS), one loader API."""
from vtok.data.loader import ShardLoader, build_loader
from vtok.data.transforms import BadSample, DataError

__all__ = ["BadSample", "DataError", "ShardLoader", "build_loader"]
