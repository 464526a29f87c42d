"""The GPU table (``gpus.yaml`` beside this file, extendable with a user YAML of the same shape)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vtok.config import RecipeError

TABLE = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class GPU:
    """One accelerator: usable memory, dense bf16 peak and (optionally) an hourly price."""

    name: str
    memory_gib: float
    bf16_tflops: float
    price_per_hour: float = 0.0
    match: tuple[str, ...] = field(default=())

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


def load_gpus(extra: str | Path = "") -> dict[str, GPU]:
    """The built-in table, updated by the entries of the YAML file ``extra`` (when given)."""
    entries = yaml.safe_load(TABLE.read_text())
    if extra:
        path = Path(extra)
        if not path.is_file():
            raise RecipeError(f"GPU table {path} not found; write entries like those in {TABLE}")
        more = yaml.safe_load(path.read_text()) or {}
        if not isinstance(more, dict):
            raise RecipeError(f"GPU table {path}: expected a mapping NAME -> {{memory_gib, bf16_tflops}}")
        entries.update(more)
    gpus = {}
    for name, e in entries.items():
        try:
            gpus[str(name)] = GPU(str(name), float(e["memory_gib"]), float(e["bf16_tflops"]),
                                  float(e.get("price_per_hour", 0.0)), tuple(e.get("match", [str(name)])))
        except (KeyError, TypeError, ValueError) as err:
            raise RecipeError(f"GPU table entry {name!r}: needs numbers memory_gib and bf16_tflops ({err})") from None
    return gpus


def find_gpu(name: str, extra: str | Path = "") -> GPU:
    """GPU ``name`` (case-insensitive) from the table; a one-line RecipeError listing the known ones."""
    gpus = load_gpus(extra)
    found = {k.lower(): v for k, v in gpus.items()}.get(name.lower())
    if found is None:
        raise RecipeError(f"--gpu {name!r} is not in the GPU table; known: {', '.join(gpus)} "
                          f"(add yours with --gpu-table FILE.yaml, entries as in {TABLE})")
    return found


def peak_tflops_of(device_name: str) -> float:
    """Dense bf16 peak of a device named like ``torch.cuda.get_device_name()``; 0 when unknown."""
    for gpu in load_gpus().values():
        if any(m in device_name for m in gpu.match):
            return gpu.bf16_tflops
    return 0.0
