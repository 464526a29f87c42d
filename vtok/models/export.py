"""One export format for every model (tokenizers and generators alike).

    <dir>/model.safetensors   the weights (full, unsharded, float32)
    <dir>/config.json         {"format": "vtok-export", "format_version", "vtok_version", "kind",
                               "arch" (a registry name), "config" (the model's full config),
                               "token_spec" (vtok.models.api.TokenSpec), "resolution", + provenance
                               (recipe, task, step, ema, and for generators the tokenizer export)}

``save_export`` writes it (``vtok export``, ``Trainer.export``); ``load_export`` is the one loader
that ``vtok precompute``, ``vtok sample``, ``vtok eval`` and the generator tasks use. The model is
rebuilt from the registry class and the saved config, never from guesses about key names, and the
weights are read with safetensors (no pickle).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtok
from vtok.config import RecipeError
from vtok.models.api import TokenSpec, model_kind
from vtok.models.registry import MODELS, config_from_dict

FORMAT = "vtok-export"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FIX = {"tokenizer": "pass the `vtok export` directory of a tokenizer run (fqgan, ...)",
       "generator": "pass the `vtok export` directory of a generator run (gpt, ...)"}


class ExportError(RecipeError):
    """A missing, foreign or mismatched export (a user error: one line, exit 2)."""


@dataclass
class Export:
    """A loaded export: the model (eval mode) and what ``config.json`` says about it."""

    model: nn.Module
    kind: str
    arch: str
    token_spec: TokenSpec
    meta: dict[str, Any]

    @property
    def resolution(self) -> int:
        return int(self.meta.get("resolution") or self.token_spec.resolution)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def save_export(out_dir: str | Path, model: nn.Module, arch: str, *, state: dict[str, torch.Tensor] | None = None,
                token_spec: TokenSpec | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (registry name ``arch``) as an export; ``state``: its full weights when the
    module itself is sharded (default: ``model.state_dict()``); ``token_spec``: default the model's.
    Returns the weights path."""
    from vtok.data.writers import atomic_write_bytes
    from vtok.files import save_safetensors

    if arch not in MODELS or not isinstance(model, MODELS[arch].model):
        raise ExportError(f"cannot export a {type(model).__name__} as {arch!r}: not that registry entry's class")
    spec = token_spec or model.token_spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    weights = save_safetensors({k: v.detach().float().cpu().contiguous() if v.is_floating_point()
                                else v.detach().cpu().contiguous() for k, v in state.items()},
                               out / WEIGHTS)  # atomic, and with the umask's mode (not 0600)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "vtok_version": vtok.__version__,
              "kind": model_kind(model), "arch": arch, "config": _jsonable(model.cfg),
              "token_spec": spec.to_dict(), "resolution": spec.resolution, **(meta or {})}
    atomic_write_bytes(out / CONFIG, json.dumps(config, indent=1, default=str).encode())
    return weights


def read_export_config(export_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """``config.json`` of an export, checked: it exists, is a vtok export, and is of ``kind``."""
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise ExportError(f"{path} not found: not a `vtok export` directory; write one with "
                          "`vtok export RECIPE --out DIR`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-export it") from None
    if config.get("format") != FORMAT:
        raise ExportError(f"{export_dir} was not written in the vtok export format (an older vtok or "
                          "another tool); re-export it with `vtok export RECIPE --out DIR`")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{export_dir} has export format {config['format_version']}, newer than this "
                          f"vtok ({vtok.__version__}) reads ({FORMAT_VERSION}); upgrade vtok")
    if kind is not None and config.get("kind") != kind:
        raise ExportError(f"{export_dir} holds a {config.get('kind')} ({config.get('arch')}), but a {kind} "
                          f"is expected here; {FIX.get(kind, '')}")
    return config


def load_export(export_dir: str | Path, kind: str | None = None, device: torch.device | str = "cpu") -> Export:
    """The model of an export in eval mode on ``device``; ``kind``: "tokenizer" | "generator" to
    insist on one (a one-line ``ExportError`` names what the directory holds otherwise)."""
    from safetensors.torch import load_file

    from vtok.models.weights import load_state_dict_strict

    config = read_export_config(export_dir, kind)
    arch = config["arch"]
    if arch not in MODELS:
        raise ExportError(f"{export_dir}: model {arch!r} is not registered in this vtok; known: "
                          f"{', '.join(MODELS)}")
    entry = MODELS[arch]
    model = entry.model(config_from_dict(type(entry.config), config["config"]))
    weights = Path(export_dir) / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights} not found: the export is incomplete; re-export it")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on truncated / foreign files
        raise ExportError(f"{weights} is not a readable safetensors file ({e}); re-export it") from None
    stale = getattr(model, "stale_state", None)  # weights a model class knows an older vtok wrote
    if stale is not None and (why := stale(state)):
        raise ExportError(f"{weights}: {why}")
    load_state_dict_strict(model, state, str(weights))
    return Export(model.to(device).eval(), config["kind"], arch, TokenSpec.from_dict(config["token_spec"]), config)


__all__ = ["CONFIG", "Export", "ExportError", "FORMAT", "WEIGHTS", "load_export", "read_export_config",
           "save_export"]
