"""Released checkpoints -> vtok exports: ``vtok import KIND CHECKPOINT --out EXPORT_DIR``.

One importer per KIND (``@register_importer("dit")``, ...). Each knows the official state-dict
layout of its model family and offers:

* ``recognise(state)``: which registry size the checkpoint is (``(arch, config overrides)``), from
  the shapes alone; a size vtok does not register is a one-line ``ImporterError`` naming what was
  found;
* ``to_vtok(state, model)`` / ``to_official(state, model)``: pure key mappings (tensors in, tensors
  out), exact inverses of each other;
* ``metadata(model, checkpoint, options)``: the token spec and the export metadata.

``import_checkpoint`` reads the file safely (safetensors, or ``torch.load(weights_only=True)``),
takes the EMA weights when a training checkpoint holds both, checks every official key and shape
before mapping (one line naming unmapped / missing / mis-shaped keys) and writes a normal vtok
export with ``save_export``, loadable by ``load_export`` like any trained model.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vtok.config import RecipeError
from vtok.models.api import TokenSpec
from vtok.models.weights import key_names as names, shape_mismatch



class ImporterError(RecipeError):
    """A checkpoint that cannot be imported (unreadable, another kind, another size, keys that do
    not map); the message is one line (a user error: exit 2)."""


@dataclass
class ImportOptions:
    """What ``vtok import`` was asked for besides the file."""

    ema: bool = True  # the EMA weights when the file holds both
    vae: str = ""  # a local diffusers AutoencoderKL directory to record in the export
    arch: str = ""  # insist on this registry size (a checkpoint of another size is refused)
    image_size: int = 0  # pixels per side the model was trained at, where the weights do not say (0: infer)
    tokenizer: str = ""  # a generator's tokenizer export, recorded for decoding (vtok sample's default)


@dataclass
class Checkpoint:
    """A read checkpoint: the chosen state dict and where it came from."""

    path: str
    state: dict[str, torch.Tensor]
    picked: str = ""  # "" (a raw state dict) or the top-level entry used ("ema", "model", ...)
    available: tuple[str, ...] = ()  # the top-level entries holding state dicts
    dropped: dict[str, int] = field(default_factory=dict)  # key group -> count left out (e.g. "vae")


class Importer:
    """Base class; see the module docstring. ``kind`` is the registered name."""

    kind = ""
    title = ""  # e.g. "DiT (facebookresearch/DiT)"

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The model's keys, and counts of key groups that belong elsewhere (e.g. a bundled VAE)."""
        return state, {}

    def unsaved_config(self, options: ImportOptions, path: str) -> dict[str, Any]:
        """Config the weights do not hold (e.g. a GPT's token grid), from the options or the file name."""
        return {}

    def fixed_keys(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Official keys holding fixed tables (not learned) that vtok recomputes: their expected values."""
        return {}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        raise NotImplementedError


IMPORTERS: dict[str, Importer] = {}


def register_importer(kind: str) -> Callable[[type[Importer]], type[Importer]]:
    """Class decorator: register an ``Importer`` subclass under ``kind`` (``vtok import KIND``)."""
    def wrap(cls: type[Importer]) -> type[Importer]:
        if kind in IMPORTERS:
            raise ValueError(f"importer {kind!r} registered twice")
        cls.kind = kind
        IMPORTERS[kind] = cls()
        return cls
    return wrap


def get_importer(kind: str) -> Importer:
    _load_builtin()
    if kind not in IMPORTERS:
        raise ImporterError(f"unknown import kind {kind!r}; known: {', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[kind]


def _load_builtin() -> None:
    from vtok.importers import dit, flextok, fqgan, llamagen  # noqa: F401  (registration)


def rename(key: str, rules: list[tuple[str, Any]]) -> str:
    """``key`` with each (regex, replacement) rule applied in order (each at most once); a
    replacement is a string or a function of the match (``re.sub``'s)."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def count_indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many distinct N the keys ``<prefix>N.<...>`` have (e.g. ``count_indexed(sd, "blocks.")``: depth)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def require_keys(state: dict[str, torch.Tensor], need: list[str], what: str, hint: str = "is KIND right?") -> None:
    """One-line ``ImporterError`` unless ``state`` has every key of ``need`` (``what``: e.g. "a DiT")."""
    absent = [k for k in need if k not in state]
    if absent:
        raise ImporterError(f"not {what} checkpoint: no {names(absent)} (its keys start {names(sorted(state))}); "
                            f"{hint}")


def published_first(candidates: list[str]) -> str:
    """The registry size to import as, of several with the same shapes: one with a published count first."""
    from vtok.models.registry import MODELS

    return sorted(candidates, key=lambda n: MODELS[n].params is None)[0]


def drop_usage_buffers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``split`` of the LlamaGen-family VQ tokenizers: ``*codebook_used`` are usage statistics, not weights."""
    stats = [k for k in state if k.endswith("codebook_used")]
    return {k: v for k, v in state.items() if k not in stats}, ({"codebook usage": len(stats)} if stats else {})


# -- reading ---------------------------------------------------------------------------------------
WRAPPERS = ("ema", "model", "state_dict", "module", "model_ema")  # top-level entries tried, EMA first


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value) and any(
        torch.is_tensor(v) for v in value.values())


def _safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; ``argparse.Namespace`` (the ``args`` entry of DiT's
    train.py checkpoints) is the one extra class allowed."""
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        if allow is not None:
            with allow([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImporterError(f"{path} is not a readable PyTorch / safetensors checkpoint ({first[:160]}); "
                            "pass the released .pt / .pth / .safetensors file") from None


def read_checkpoint(path: str | Path, ema: bool = True) -> Checkpoint:
    """The state dict of a released file: safetensors (by magic or suffix) or a torch file loaded with
    ``weights_only=True``; a training checkpoint ``{"model", "ema", ...}`` gives ``ema`` (or, with
    ``ema=False``, ``model``); a raw state dict is taken as is. Non-tensor entries are dropped."""
    path = Path(path)
    if not path.is_file():
        raise ImporterError(f"{path} not found: pass the released checkpoint file")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file
        try:
            state: Any = load_file(str(path))
        except Exception as e:
            raise ImporterError(f"{path} is not a readable safetensors file ({str(e)[:160]})") from None
        return Checkpoint(str(path), dict(state))
    obj = _safe_load(path)
    if not isinstance(obj, dict):
        raise ImporterError(f"{path} holds a {type(obj).__name__}, not a state dict")
    wrapped = [k for k in WRAPPERS if _is_state(obj.get(k))]
    if wrapped:
        order = wrapped if ema else [k for k in wrapped if "ema" not in k] or wrapped
        picked = order[0]
        state = obj[picked]
    elif _is_state(obj):
        picked, state = "", obj
    else:
        raise ImporterError(f"{path} holds no state dict (top-level keys: {names(sorted(map(str, obj)))})")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if any(k.startswith("module.") for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # a DDP-wrapped save
    return Checkpoint(str(path), state, picked, tuple(wrapped))


# -- checking --------------------------------------------------------------------------------------
def official_mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                      fixed: dict[str, torch.Tensor] | None = None) -> str:
    """'' when ``state`` has exactly the ``expected`` official keys and shapes (and the fixed tables
    hold their expected values), else one line naming the unmapped, missing and mis-shaped keys."""
    problem = shape_mismatch(state, expected, extra="unmapped keys", other="expected")
    parts = [problem] if problem else []
    if not parts and fixed:
        off = [k for k, v in fixed.items() if not torch.allclose(state[k].float(), v.float(), atol=5e-3)]
        if off:
            parts.append(f"fixed tables that differ from the official formula: {len(off)} ({names(off)})")
    return "; ".join(parts)


def expected_official(importer: Importer, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The official key -> shape list of ``model``'s size (the official layout of its state dict)."""
    return {k: tuple(v.shape) for k, v in importer.to_official(model.state_dict(), model).items()}


# -- the command -----------------------------------------------------------------------------------
@dataclass
class ImportResult:
    weights: Path
    arch: str
    overrides: dict[str, Any]
    checkpoint: Checkpoint
    meta: dict[str, Any]


def build_for(arch: str, overrides: dict[str, Any]) -> nn.Module:
    from vtok.models.registry import MODELS

    return MODELS[arch].build(**overrides)


def import_checkpoint(kind: str, checkpoint: str | Path, out: str | Path,
                      options: ImportOptions | None = None) -> ImportResult:
    """Read ``checkpoint`` (a released file of ``kind``), map it onto vtok's model and write an export
    to ``out``; every failure is a one-line ``ImporterError``."""
    from vtok.models.export import save_export
    from vtok.models.registry import MODELS
    from vtok.models.weights import load_state_dict_strict

    options = options or ImportOptions()
    importer = get_importer(kind)
    ckpt = read_checkpoint(checkpoint, ema=options.ema)
    state, dropped = importer.split(ckpt.state)
    ckpt.dropped = dropped
    where = f"{ckpt.path}{f' [{ckpt.picked}]' if ckpt.picked else ''}"
    arch, overrides = importer.recognise(state)
    overrides.update({k: v for k, v in importer.unsaved_config(options, ckpt.path).items()
                      if getattr(MODELS[arch].config, k) != v})
    if options.arch and options.arch != arch:
        raise ImporterError(f"{where} is {arch}{_described(overrides)}, not {options.arch} as --arch asks")
    model = build_for(arch, overrides)
    problem = official_mismatch(state, expected_official(importer, model), importer.fixed_keys(model))
    if problem:
        raise ImporterError(f"{where} does not fit the official {importer.title} layout of {arch}: {problem}")
    mapped = importer.to_vtok(state, model)
    load_state_dict_strict(model, mapped, where)
    spec, meta = importer.metadata(model, arch, ckpt, options)
    ema = ("ema" in ckpt.picked) if ckpt.picked else None  # None: a raw state dict does not say
    meta = {**meta, "imported": {"kind": kind, "checkpoint": str(Path(ckpt.path).resolve()),
                                 "entry": ckpt.picked or "state dict", "ema": ema, "overrides": overrides,
                                 "left_out": dropped}}
    weights = save_export(out, model, arch, token_spec=spec, meta=meta)
    return ImportResult(weights, arch, overrides, ckpt, meta)


def _described(overrides: dict[str, Any]) -> str:
    return f" (with {', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""


__all__ = ["Checkpoint", "IMPORTERS", "ImportOptions", "ImportResult", "Importer", "ImporterError", "count_indexed",
           "drop_usage_buffers", "expected_official", "get_importer", "import_checkpoint", "official_mismatch",
           "published_first", "read_checkpoint", "register_importer", "rename", "require_keys"]
