"""Classifier-free guidance (CFG) with a guidance interval, and adaptive projected guidance (APG).

One entry point, :func:`guided`, turns a network ``net(x_t, t, cond) -> prediction`` into a guided
prediction. The conditional and the unconditional rows run in ONE network call on
``[x; x]`` with conditions ``[cond; null_cond]`` (rows concatenated by :func:`cat_conditions`);
the caller supplies the null condition (its null class / null caption).

CFG: ``u + s (c - u)``. APG (Sadat et al. 2024, as in apple/ml-flextok ``normalized_guidance``):
``d = c - u``; with momentum ``beta`` a running average ``d <- d + beta * d_prev`` replaces ``d``;
with a norm threshold ``r`` the per-sample norm of ``d`` is capped at ``r``; ``d`` is split into
its component parallel to ``c`` and the orthogonal rest; the result is
``c + (s - 1) (d_orth + eta * d_par)``. With ``eta = 1``, no momentum and no threshold this is
exactly CFG. FlexTok samples with momentum -0.5, threshold 2.5, eta 0 (the defaults here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vtok.models.api import Condition

Net = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """How to guide a sampler.

    ``scale``: guidance scale ``s`` (1 = no guidance: only the conditional rows run).
    ``interval``: ``(t_lo, t_hi)`` in normalized time (0 = data, 1 = noise: the flow ``t``, or a
    DDPM timestep divided by ``T - 1``); outside it the conditional prediction is used and the
    unconditional rows are not run.
    ``apg``: use adaptive projected guidance instead of plain CFG, with ``momentum`` (beta),
    ``norm_threshold`` (r; 0 disables the cap) and ``eta`` (weight of the parallel component).
    """

    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    apg: bool = False
    momentum: float = -0.5
    norm_threshold: float = 2.5
    eta: float = 0.0

    def __post_init__(self):
        lo, hi = (float(v) for v in self.interval)
        if not lo <= hi:
            raise ValueError(f"Guidance.interval={self.interval}: expected t_lo <= t_hi")
        object.__setattr__(self, "interval", (lo, hi))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def enabled(self) -> bool:
        """False when guidance changes nothing (scale 1): samplers then skip the unconditional rows."""
        return self.scale != 1.0

    def covers(self, t_norm: float) -> bool:
        """Whether normalized time ``t_norm`` lies in the guidance interval."""
        return self.interval[0] <= t_norm <= self.interval[1]


def as_guidance(guidance: Guidance | float | None) -> Guidance | None:
    """``None`` / a plain scale / a :class:`Guidance` -> ``Guidance`` or None."""
    if guidance is None or isinstance(guidance, Guidance):
        return guidance
    return Guidance(scale=float(guidance))


class MomentumBuffer:
    """APG's running average of the guidance direction: ``avg <- d + momentum * avg``.

    One buffer per sampling run (it holds a (B, ...) tensor, one row per sample)."""

    def __init__(self, momentum: float):
        self.momentum = float(momentum)
        self.average: torch.Tensor | None = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        """Fold ``diff`` (B, ...) into the average and return the new average (B, ...)."""
        self.average = diff if self.average is None else diff + self.momentum * self.average
        return self.average


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Broadcast a one-row tensor to ``n`` rows (views only)."""
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 and n > 1 else t


def _cat_field(a: torch.Tensor | None, b: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError(f"cat_conditions: Condition.{name} is set on one side only")
    return torch.cat([a, _rows(b, n).to(a.dtype)])


def cat_conditions(a: Condition, b: Condition) -> Condition:
    """Rows of ``a`` then rows of ``b``: labels (Na+Nb,), text (Na+Nb, L, D), text_mask, extra.

    A one-row ``b`` (a single null class / null caption) is broadcast to ``len(a)`` rows. Texts of
    different lengths are right-padded with zeros and ``text_mask`` False; a missing mask next to a
    text counts as all True. Fields set on one side only are an error."""
    n = len(a) if len(a) else len(b)
    labels = _cat_field(a.labels, b.labels, n, "labels")
    text = mask = None
    if a.text is not None or b.text is not None:
        if a.text is None or b.text is None:
            raise ValueError("cat_conditions: Condition.text is set on one side only")
        ta, tb = a.text, _rows(b.text, n).to(a.text.dtype)
        ma = a.text_mask if a.text_mask is not None else torch.ones(ta.shape[:2], dtype=torch.bool,
                                                                     device=ta.device)
        mb = b.text_mask if b.text_mask is not None else torch.ones(b.text.shape[:2], dtype=torch.bool,
                                                                    device=tb.device)
        mb = _rows(mb, n)
        length = max(ta.shape[1], tb.shape[1])
        ta, tb = (F.pad(t, (0, 0, 0, length - t.shape[1])) for t in (ta, tb))
        ma, mb = (F.pad(m.bool(), (0, length - m.shape[1]), value=False) for m in (ma, mb))
        text, mask = torch.cat([ta, tb]), torch.cat([ma, mb])
    if set(a.extra) != set(b.extra):
        raise ValueError(f"cat_conditions: extra keys differ ({sorted(a.extra)} vs {sorted(b.extra)})")
    extra = {k: torch.cat([v, _rows(b.extra[k], n).to(v.dtype)]) for k, v in a.extra.items()}
    return Condition(labels=labels, text=text, text_mask=mask, extra=extra)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain CFG: ``uncond + scale * (cond - uncond)`` on (B, ...) predictions."""
    return uncond + scale * (cond - uncond)


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def apg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, eta: float = 0.0,
                norm_threshold: float = 0.0, buffer: MomentumBuffer | None = None) -> torch.Tensor:
    """APG on (B, ...) predictions: momentum (via ``buffer``), per-sample norm cap at
    ``norm_threshold`` (> 0), projection onto ``cond`` (over all non-batch dims, in float64 except
    on MPS), then ``cond + (scale - 1) * (d_orth + eta * d_par)``. Returns (B, ...)."""
    diff = cond - uncond
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1)
        diff = diff * _bview(torch.clamp(norm_threshold / norm, max=1.0), diff)
    work = torch.float32 if cond.device.type == "mps" else torch.float64
    d, c = diff.to(work).flatten(1), cond.to(work).flatten(1)
    unit = F.normalize(c, dim=1)
    par = (d * unit).sum(dim=1, keepdim=True) * unit
    update = ((d - par) + eta * par).view_as(cond).to(cond.dtype)
    return cond + (scale - 1.0) * update


def guided(net: Net, x: torch.Tensor, t: torch.Tensor, cond: Condition, null_cond: Condition | None,
           guidance: Guidance | float | None, *, t_norm: float | torch.Tensor | None = None,
           buffer: MomentumBuffer | None = None, guided_channels: int | None = None,
           channel_dim: int = -1) -> torch.Tensor:
    """The guided prediction of ``net`` at ``x`` (B, ...) and times ``t`` (B,).

    Without guidance (None or scale 1), or when ``t_norm`` lies outside ``guidance.interval``,
    this is ``net(x, t, cond)`` (B rows). Otherwise ONE call ``net([x; x], [t; t], [cond; null])``
    (2B rows) and CFG or APG on the two halves. ``t_norm``: normalized time for the interval, a
    float (one decision for the batch) or a (B,) tensor (per row); default ``t`` itself (flow
    time). ``buffer``: APG momentum state (none: no momentum). ``guided_channels``: guide only the
    first k entries along ``channel_dim`` (a DDPM epsilon next to its learned variance); the rest
    come from the conditional rows. Returns the prediction, shaped like ``net``'s output.
    """
    guidance = as_guidance(guidance)
    if guidance is None or not guidance.enabled:
        return net(x, t, cond)
    if null_cond is None:
        raise ValueError("guided: guidance scale != 1 needs a null condition")
    tn = t if t_norm is None else t_norm
    row_mask = None
    if isinstance(tn, torch.Tensor):
        lo, hi = guidance.interval
        row_mask = (tn.float() >= lo) & (tn.float() <= hi)
        if not bool(row_mask.any()):
            return net(x, t, cond)
    elif not guidance.covers(float(tn)):
        return net(x, t, cond)
    out = net(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(cond, null_cond))
    c, u = out.chunk(2)
    rest = None
    if guided_channels is not None:
        dim = channel_dim % c.dim()
        rest = c.narrow(dim, guided_channels, c.shape[dim] - guided_channels)
        c, u = c.narrow(dim, 0, guided_channels), u.narrow(dim, 0, guided_channels)
    if guidance.apg:
        g = apg_combine(c, u, guidance.scale, eta=guidance.eta, norm_threshold=guidance.norm_threshold,
                        buffer=buffer)
    else:
        g = cfg_combine(c, u, guidance.scale)
    if row_mask is not None:
        g = torch.where(_bview(row_mask, g), g, c)
    return g if rest is None else torch.cat([g, rest], dim=channel_dim % c.dim())


def momentum_buffer_for(guidance: Guidance | float | None) -> MomentumBuffer | None:
    """A fresh momentum buffer when ``guidance`` is APG with momentum, else None (per sampling run)."""
    g = as_guidance(guidance)
    return MomentumBuffer(g.momentum) if g is not None and g.apg and g.momentum != 0 else None


__all__ = ["Guidance", "MomentumBuffer", "Net", "apg_combine", "as_guidance", "cat_conditions",
           "cfg_combine", "guided", "momentum_buffer_for"]
