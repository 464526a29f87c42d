"""Loading a user-supplied weights file into a module: every key and shape checked first, so a wrong
file is one line (what is missing / unexpected / mis-shaped, and the first names) instead of
torch's many-line ``load_state_dict`` report."""
from __future__ import annotations

import torch
from torch import nn

from vtok.config import RecipeError

SHOW = 3  # key names quoted per category


class WeightsError(RecipeError):
    """A weights file that does not fit its module; the message is one line naming the file."""


def key_names(keys: list[str]) -> str:
    """The first ``SHOW`` names of ``keys``, quoted, with "..." when there are more."""
    shown = ", ".join(f"'{k}'" for k in keys[:SHOW])
    return shown + (", ..." if len(keys) > SHOW else "")


def shape_mismatch(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], *,
                   extra: str = "unexpected keys", other: str = "model",
                   optional: tuple[str, ...] = ()) -> str:
    """'' when ``state`` has exactly the keys of ``want`` (name -> shape) with those shapes, else one
    line: how many keys are missing / extra (called ``extra``) / not tensors (and the first names), and
    the first shape mismatch with both shapes (``other`` names the side ``want`` describes). Keys
    ending in one of ``optional`` may be absent."""
    missing = [k for k in want if k not in state and not k.endswith(optional or ("\0",))]
    unexpected = [k for k in state if k not in want]
    not_tensors = [k for k in state if k in want and not torch.is_tensor(state[k])]
    wrong = [k for k in want if k in state and k not in not_tensors and tuple(state[k].shape) != tuple(want[k])]
    parts = []
    if missing:
        parts.append(f"missing keys: {len(missing)} ({key_names(missing)})")
    if unexpected:
        parts.append(f"{extra}: {len(unexpected)} ({key_names(unexpected)})")
    if not_tensors:
        parts.append(f"not tensors: {len(not_tensors)} ({key_names(not_tensors)})")
    if wrong:
        k = wrong[0]
        parts.append(f"shape mismatches: {len(wrong)} (first '{k}': file {tuple(state[k].shape)}, "
                     f"{other} {tuple(want[k])})")
    return "; ".join(parts)


def state_dict_mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``module`` key for key and shape for shape, else one line (see
    :func:`shape_mismatch`). BatchNorm ``num_batches_tracked`` counters may be absent (older
    checkpoints lack them)."""
    if not isinstance(state, dict):
        return f"expected a state dict of tensors, got {type(state).__name__}"
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return shape_mismatch(state, want, optional=("num_batches_tracked",))


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` when keys and shapes match exactly, else raise a one-line
    WeightsError naming ``source`` (the file it came from) and what does not match.

    BatchNorm ``num_batches_tracked`` counters absent from ``state`` keep the module's values.
    """
    problem = state_dict_mismatch(module, state)
    if problem:
        raise WeightsError(f"weights {source} do not match {type(module).__name__}: {problem}; "
                           "is it the right file for this model?")
    counters = {k: v for k, v in module.state_dict().items() if k not in state}
    module.load_state_dict({**counters, **state}, strict=True)
