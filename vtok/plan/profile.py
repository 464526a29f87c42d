"""A recipe's model measured on the ``meta`` device: parameters, FLOPs and activation bytes per sample.

    prof = profile_recipe(recipe)        # builds the task on meta, one batch's shapes from its shards
    prof.flops_per_sample                # torch's FLOP counter over forward + backward of every phase
    prof.phases[0].saved_bytes           # bytes autograd keeps for backward, per micro-batch

Nothing is allocated: the task's modules are built under ``torch.device("meta")`` and each optimizer
phase runs ``task.loss`` + ``backward`` on a meta copy of one real batch (the shapes the loader gives,
so every family is measured by the same code). Activation bytes are the unique storages autograd saves
for backward (parameters and the batch left out), attributed to the ``blocks()`` they were saved in,
which is what activation checkpointing trades: a checkpointed block keeps only its inputs and
recomputes its saved tensors during backward, one block at a time. With ``train.precision=bf16`` the
matmul-class functions run on bf16 casts of their inputs and the norm / softmax / loss functions on
fp32 ones, as CUDA autocast does (autocast itself does not act on meta tensors); attention runs as
the fused kernel a GPU uses (``device_type="cpu"`` keeps CPU autocast's rules and the math kernel,
for checking against a real CPU run).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from vtok.config import Recipe
from vtok.parallel.strategy import blocks_of

# Autocast's lists (torch/csrc/autograd/autocast_mode.cpp) for the functions vtok's models call.
_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
        F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
        torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}
_FP32_LOSSES = {F.cross_entropy, F.mse_loss, F.nll_loss, F.binary_cross_entropy, torch.cdist}
_FP32 = {
    # CUDA also runs norms, softmaxes and the other losses in fp32
    "cuda": _FP32_LOSSES | {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.l1_loss, F.kl_div,
                            F.binary_cross_entropy_with_logits, torch.softmax, torch.log_softmax,
                            torch.Tensor.softmax, torch.Tensor.log_softmax, torch.logsumexp, F.normalize},
    "cpu": _FP32_LOSSES,
}


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast of ``device_type`` on tensors of any device (meta included): float32 inputs of
    matmul-class functions become bfloat16; bfloat16 inputs of that device's fp32 functions (CUDA:
    norms, softmaxes, losses; CPU: losses) become float32. Like autocast, a parameter (a leaf that
    requires grad) is cast once per region and its cast reused."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.fp32 = _FP32[device_type]
        self.casts: dict[int, torch.Tensor] = {}

    def _cast(self, x: Any, src: torch.dtype, dst: torch.dtype) -> Any:
        if isinstance(x, torch.Tensor) and x.dtype == src:
            if x.is_leaf and x.requires_grad:
                if id(x) not in self.casts:
                    self.casts[id(x)] = x.to(dst)
                return self.casts[id(x)]
            return x.to(dst)
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, src, dst) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cast = ((torch.float32, torch.bfloat16) if func in _LOW else
                (torch.bfloat16, torch.float32) if func in self.fp32 else None)
        if cast:
            args = self._cast(args, *cast)
            kwargs = {k: self._cast(v, *cast) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a CUDA GPU runs it: a fused kernel (memory-efficient
    attention) that keeps q, k, v, the output and its log-sum-exp for backward, not the (B, heads,
    L, L) attention weights that the math kernel (the one meta and CPU tensors get) saves."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention or kwargs.get("enable_gqa"):
            return func(*args, **kwargs)
        q, k, v, *rest = args
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        opts = {**dict(zip(names, rest)), **kwargs}
        mask = opts.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, float(opts.get("dropout_p", 0.0)), bool(opts.get("is_causal", False)),
            scale=opts.get("scale"))[0]


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, which hooks the backward of every module's
    inputs and fails on a forward that differentiates itself (an R1 penalty's ``autograd.grad``);
    a total needs no per-module split."""

    parents = ("Global",)

    def __enter__(self) -> "_NoModuleTracking":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (its formulas, its decompositions), totals only."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class ModuleProfile:
    """One trained module: trainable element count, its bytes as built, and its FSDP units."""

    params: int
    param_bytes: int
    blocks: int  # entries of ``blocks()`` (0: the module is one unit)
    largest_block: int  # elements of the largest block (the module itself when it has none)
    root_params: int  # elements outside the blocks (gathered for the whole step under FSDP2)


@dataclass
class PhaseProfile:
    """One optimizer phase on one micro-batch of ``micro_batch`` samples."""

    name: str
    modules: list[str]
    forward_flops: float
    flops: float  # forward + backward
    saved_bytes: int  # everything autograd keeps for backward
    block_saved_bytes: int  # the part saved inside blocks()
    max_block_saved_bytes: int  # one block's saved bytes (recomputed at once under checkpointing)
    block_input_bytes: int  # the blocks' inputs (what checkpointing keeps instead)

    def activation_bytes(self, checkpointing: bool) -> int:
        """Bytes alive for backward at the end of this phase's forward (+ one block's recompute)."""
        if not checkpointing or not self.block_saved_bytes:
            return self.saved_bytes
        return (self.saved_bytes - self.block_saved_bytes + self.block_input_bytes
                + self.max_block_saved_bytes)


@dataclass
class TaskProfile:
    """Everything ``vtok plan`` needs from the model, per micro-batch of ``micro_batch`` samples."""

    task: str
    precision: str
    micro_batch: int
    modules: dict[str, ModuleProfile]
    frozen_bytes: int
    phases: list[PhaseProfile] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules.values())

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward of every phase) per sample, torch's counter."""
        return sum(p.flops for p in self.phases) / self.micro_batch

    @property
    def forward_flops_per_sample(self) -> float:
        return sum(p.forward_flops for p in self.phases) / self.micro_batch

    def activation_bytes(self, checkpointing: bool) -> int:
        """Per micro-batch: the largest phase's (phases run one after another)."""
        return max((p.activation_bytes(checkpointing) for p in self.phases), default=0)


class SavedTensors:
    """Counts the unique storages autograd saves, and which block (if any) each was saved in."""

    def __init__(self, exclude: set[int]):
        self.exclude = set(exclude)
        self.sizes: dict[int, int] = {}
        self.in_block: dict[int, int] = {}  # storage -> index of the block that saved it
        self.block_inputs: dict[int, int] = {}
        self.current: list[int] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.sizes:
            self.sizes[key] = t.untyped_storage().nbytes()
            if self.current:
                self.in_block[key] = self.current[-1]
        return t

    @contextlib.contextmanager
    def watching(self, blocks: list[nn.Module]) -> Iterator[None]:
        def pre(index):
            def hook(_module, args, kwargs):
                self.current.append(index)
                for a in [*args, *kwargs.values()]:
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        self.block_inputs.setdefault(_storage_key(a), a.untyped_storage().nbytes())
            return hook

        def post(_module, _args, _out):
            self.current.pop()

        handles = []
        for i, b in enumerate(blocks):
            handles += [b.register_forward_pre_hook(pre(i), with_kwargs=True), b.register_forward_hook(post)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()

    def phase(self, name: str, modules: list[str], forward_flops: float, flops: float,
              casts: Iterable[torch.Tensor] = ()) -> PhaseProfile:
        """The phase's numbers; ``casts`` (autocast's bf16 copies of the parameters) stay alive until
        the autocast region ends, checkpointed or not, so they count outside every block."""
        for c in casts:
            key = _storage_key(c)
            self.sizes[key] = c.untyped_storage().nbytes()
            self.in_block.pop(key, None)
        per_block: dict[int, int] = {}
        for key, index in self.in_block.items():
            per_block[index] = per_block.get(index, 0) + self.sizes[key]
        # a block's input is kept by checkpointing unless it is already saved outside every block
        inputs = sum(n for k, n in self.block_inputs.items() if k not in self.exclude
                     and (k not in self.sizes or k in self.in_block))
        return PhaseProfile(name, modules, forward_flops, flops, sum(self.sizes.values()),
                            sum(per_block.values()), max(per_block.values(), default=0), inputs)


def _to_meta(value: Any, batch_size: int) -> Any:
    """A meta tensor of ``value``'s shape with ``batch_size`` rows (lists are repeated)."""
    if isinstance(value, torch.Tensor):
        return torch.empty((batch_size, *value.shape[1:]), dtype=value.dtype, device="meta")
    if isinstance(value, list):
        return [value[i % len(value)] if i < len(value) else f"{value[i % len(value)]}-{i}"
                for i in range(batch_size)]
    return value


def example_batch(recipe: Recipe, batch_size: int) -> dict[str, Any]:
    """One batch of the recipe's training data as the trainer sees it (images float in [-1, 1]) on
    the ``meta`` device, with ``batch_size`` rows; read from the first shard."""
    from dataclasses import replace

    from vtok.data.loader import build_loader
    from vtok.data.transforms import normalize_batch

    cfg = replace(recipe.data, batch_size=2, num_workers=0, shuffle=False)
    loader = build_loader(cfg, rank=0, world_size=1, seed=recipe.seed)
    batch = normalize_batch(next(iter(loader)))
    return {k: _to_meta(v, batch_size) for k, v in batch.items()}


def _module_profile(module: nn.Module) -> ModuleProfile:
    trainable = [p for p in module.parameters() if p.requires_grad]
    blocks = blocks_of(module)
    sizes = [sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks]
    total = sum(p.numel() for p in trainable)
    return ModuleProfile(total, sum(p.numel() * p.element_size() for p in trainable), len(blocks),
                         max(sizes, default=total), total - sum(sizes))


def profile_task(task: Any, batch: dict[str, Any], precision: str, micro_batch: int,
                 device_type: str = "cuda") -> TaskProfile:
    """Run every optimizer phase of ``task`` (built on meta) once on ``batch`` (meta tensors), with
    ``device_type``'s bf16 autocast rules when ``precision`` is bf16."""
    modules = {name: _module_profile(task.modules[name]) for name in dict.fromkeys(
        m for mods in task.optimizers.values() for m in mods)}
    frozen = sum(p.numel() * p.element_size() for f in getattr(task, "frozen", {}).values()
                 for p in f.parameters())
    trainable = {name: [p for p in task.modules[name].parameters() if p.requires_grad] for name in modules}
    exclude = {_storage_key(p) for m in list(task.modules.values()) + list(getattr(task, "frozen", {}).values())
               for p in [*m.parameters(), *m.buffers()]}
    exclude |= {_storage_key(v) for v in batch.values() if isinstance(v, torch.Tensor)}
    profile = TaskProfile(type(task).__name__, precision, micro_batch, modules, frozen)
    for phase, names in task.optimizers.items():
        for name, params in trainable.items():  # the trainer's begin_phase: other phases' modules frozen
            for p in params:
                p.requires_grad_(name in names)
        saved = SavedTensors(exclude)
        blocks = [b for n in names for b in blocks_of(task.modules[n])]
        cast = MetaAutocast(device_type) if precision == "bf16" else contextlib.nullcontext()
        kernels = FusedAttention() if device_type == "cuda" else contextlib.nullcontext()
        with flop_counter() as counter:
            with saved.watching(blocks), cast, kernels:
                loss, _ = task.loss(phase, batch, 0)
            forward = float(counter.get_total_flops())
            loss.backward()
        casts = cast.casts.values() if isinstance(cast, MetaAutocast) else ()
        profile.phases.append(saved.phase(phase, list(names), forward, float(counter.get_total_flops()), casts))
        for params in trainable.values():
            for p in params:
                p.grad = None
    for params in trainable.values():
        for p in params:
            p.requires_grad_(True)
    return profile


def profile_recipe(recipe: Recipe, micro_batch: int = 0, device_type: str = "cuda") -> TaskProfile:
    """Build ``recipe``'s task on the meta device and profile it at ``micro_batch`` samples per
    micro-batch (default: ``data.batch_size``) for a ``device_type`` (cuda / cpu) run."""
    from vtok.train.task import build_task

    micro_batch = micro_batch or recipe.data.batch_size
    batch = example_batch(recipe, micro_batch)
    with torch.device("meta"):
        task = build_task(recipe)
    task.log_step = False
    profile = profile_task(task, batch, recipe.train.precision, micro_batch, device_type)
    profile.task = recipe.train.task
    return profile
