"""Recipe sections as dataclasses. Defaults are what a single-node run should use.

A field's ``metadata["choices"]`` lists its valid values; the recipe loader enforces them.
Required fields have the omegaconf ``MISSING`` default (``???``) and fail loudly when unset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


def choice(default: str, *choices: str, doc: str = ""):
    """A string field restricted to ``choices`` (checked when a recipe is loaded)."""
    return field(default=default, metadata={"choices": (default, *choices), "doc": doc})


@dataclass
class DataConfig:
    """Where samples come from and how they become tensors (see DESIGN.md section 2)."""

    format: str = choice("wds", "mds", doc="shard format: WebDataset tars or MDS (mosaicml-streaming)")
    # wds: brace-expandable list of .tar paths or pipe: URLs, e.g. "data/train-{000000..000127}.tar".
    # mds: a local MDS directory (with index.json), or the local cache dir when `remote` is set.
    train_shards: str = MISSING
    eval_shards: str = ""
    remote: str = ""  # mds only: remote root (s3://, gs://, ...); `train_shards` is then the local cache.
    fields: list[str] = field(default_factory=lambda: ["image", "cls"])  # schema fields to load
    resolution: int = 256  # square crop side, pixels
    crop: str = choice("center", "random")
    hflip: bool = False  # random horizontal flip (training only)
    channels_last: bool = False  # return images in torch.channels_last memory format
    small_images: str = choice("error", "upscale", "skip", doc="image shorter than `resolution`")
    decoder: str = choice("simplejpeg", "pil", doc="JPEG decoder; other formats always use PIL")
    batch_size: int = 32  # per rank
    num_workers: int = 4  # DataLoader workers per rank
    prefetch_factor: int = 2
    pin_memory: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 1000  # wds: samples held for in-worker shuffling
    max_bad_fraction: float = 0.001  # corrupt samples/shards tolerated before the run stops


@dataclass
class Recipe:
    """A whole run. Later sections (model, train, parallel, ...) are added by their subsystems."""

    name: str = "run"
    seed: int = 0
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
