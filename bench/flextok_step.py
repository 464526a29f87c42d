#!/usr/bin/env python
"""FlexTok train step (SDPA + boolean mask vs FlexAttention) and decode time per image by token count.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/flextok_step.py

A small FlexTok: encoder and decoder d6 (width 384, 6 heads of 64), 16x16x4 latents in 2x2 patches
(64 patches), 256 registers over FSQ [8, 8, 8, 5, 5, 5]; fp32, 2 threads.

1. Train step (encode + nested dropout + flow loss + backward + AdamW 1e-4) at --batch, median of
   --steps interleaved steps after --warmup:
   * ``sdpa``: vtok as it is, ``F.scaled_dot_product_attention`` with the encoder's dense boolean
     prefix-LM mask (320 x 320) and no mask in the decoder: the baseline;
   * ``flex``: the same model with every attention call routed to
     ``torch.nn.attention.flex_attention`` (eager: torch's unfused reference path), the encoder's
     mask as a ``BlockMask`` from the prefix-LM ``mask_mod``;
   * ``flex compiled``: the same with ``torch.compile(flex_attention)``.
   Both flex rows are first checked against ``sdpa`` (encoder outputs within 1e-4); a variant that
   does not run on this machine is skipped with the reason printed (torch 2.14 on CPU: FlexAttention
   has no backward, so the flex rows are timed forward only: encode + decoder velocity, no grad).
2. Decode time per image (eval, no grad; 20 Euler steps, CFG 7.5 with APG as the official README,
   i.e. conditional and null rows in one batched forward) at k = 1, 16, 256 tokens, and the same at
   k = 256 with guidance off; ratios against k = 256 with CFG. vtok keeps all R registers in the
   decoder's sequence (positions >= k hold the mask token), so k does not change the work.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import types

import torch
from roofline import Roofline  # same directory
import torch.nn.functional as F

import vtok.models.layers.attention as attention_module
from vtok.config.schema import OptimConfig
from vtok.models.quant.fsq import FSQ
from vtok.models.registry import build_model
from vtok.models.tokenizers.flextok import README_GUIDANCE
from vtok.train.optim import build_adamw

DEPTH, WIDTH, CHANNELS, LATENT, REGISTERS = 6, 384, 4, 16, 256


def small_flextok() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("flextok-d12-d12", encoder_depth=DEPTH, encoder_width=WIDTH, decoder_depth=DEPTH,
                        decoder_width=WIDTH, latent_channels=CHANNELS, latent_size=LATENT, vae_downsample=8,
                        num_registers=REGISTERS, fsq=FSQ.Config(), nested_dropout="pow2")
    with torch.no_grad():  # zero-initialised heads and gates would make the decoder a constant
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def flex_parts(compiled: bool, prefix: int, length: int):
    """(attention function, prefix-LM ``BlockMask``), built once so a compiled kernel is reused."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def prefix_lm(b, h, q, kv):  # patches (q < prefix) see patches; registers see patches + earlier registers
        return (kv < prefix) | ((q >= prefix) & (kv <= q))

    block = create_block_mask(prefix_lm, None, None, length, length, device="cpu")
    return (torch.compile(flex_attention, dynamic=False) if compiled else flex_attention), block


@contextlib.contextmanager
def flex_attention_everywhere(compiled: bool, prefix: int, length: int):
    """Route vtok's self-attention through FlexAttention for the duration: a boolean mask argument
    (only the encoder passes one: the prefix-LM mask) becomes the equivalent ``BlockMask``."""
    attend, block = flex_parts(compiled, prefix, length)

    def sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
        if is_causal:
            raise NotImplementedError("causal attention is not used by FlexTok")
        return attend(q, k, v, block_mask=block if attn_mask is not None else None)

    shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    shim.scaled_dot_product_attention = sdpa
    saved = attention_module.F
    attention_module.F = shim
    try:
        yield
    finally:
        attention_module.F = saved


def train_step(model, opt, batch: dict):
    def step():
        out = model(batch["x"], keep_k=batch["keep_k"], t=batch["t"], noise=batch["noise"])
        opt.zero_grad(set_to_none=True)
        out.losses["flow"].backward()
        opt.step()
    return step


def make_batch(b: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(b, CHANNELS, LATENT, LATENT, generator=g),
            "keep_k": torch.tensor([1, 2, 4, 8, 16, 64, 128, 256] * (b // 8 + 1))[:b],
            "t": torch.rand(b, generator=g), "noise": torch.randn(b, CHANNELS, LATENT, LATENT, generator=g)}


def timed_ms(fn, n: int, warmup: int, around=contextlib.nullcontext) -> list[float]:
    out = []
    with around():
        for i in range(warmup + n):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                out.append(1000 * (time.perf_counter() - t0))
    return out


def interleaved(steps: dict, arounds: dict, n: int, warmup: int) -> dict[str, float]:
    """Median ms of one call of each ``steps[name]`` inside ``arounds[name]()``, timed in interleaved
    rounds (one call of each per round), so drift of a shared machine hits them alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, fn in steps.items():
            ms = timed_ms(fn, 1, 0, arounds[name])[0]
            if i >= warmup:
                times[name].append(ms)
    return {name: statistics.median(v) for name, v in times.items()}


def train_bench(args) -> None:
    batch = make_batch(args.batch)
    model = small_flextok().train()
    opt = build_adamw([model], OptimConfig(lr=1e-4, weight_decay=0.0))
    step = train_step(model, opt, batch)

    def forward():
        with torch.no_grad():
            model(batch["x"], keep_k=batch["keep_k"], t=batch["t"], noise=batch["noise"])

    patches = (LATENT // 2) ** 2
    length = patches + REGISTERS
    trains, forwards = {"sdpa": contextlib.nullcontext}, {"sdpa": contextlib.nullcontext}
    with torch.no_grad():
        ref = model.encoder.hidden(model.patchify(batch["x"]))
    notes = []
    for name, compiled in (("flex", False), ("flex compiled", True)):
        around = (lambda c=compiled: flex_attention_everywhere(c, patches, length))
        try:
            with around(), torch.no_grad():
                diff = float((model.encoder.hidden(model.patchify(batch["x"])) - ref).abs().max())
            if diff > 1e-4:
                notes.append(f"{name}: skipped, encoder outputs differ from SDPA by {diff:.2e}")
                continue
            timed_ms(forward, 1, 0, around)  # compiles the forward
            forwards[name] = around
        except Exception as e:  # noqa: BLE001 - a benchmark reports why a variant cannot run
            notes.append(f"{name}: skipped on this machine: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        try:
            timed_ms(step, 1, 0, around)  # a first step (compiles the backward)
            trains[name] = around
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} train step: skipped on this machine: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}")
    params = sum(p.numel() for p in model.parameters())
    print(f"FlexTok d{DEPTH}-d{DEPTH} (width {WIDTH}, {params / 1e6:.1f}M params) on {LATENT}x{LATENT}x{CHANNELS} "
          f"latents + {REGISTERS} registers ({length} tokens), batch {args.batch}, fp32, {torch.get_num_threads()} "
          f"threads; FlexAttention checked against SDPA on the encoder (max abs diff < 1e-4)")
    for note in notes:
        print(f"  {note}")
    for title, fn, arounds in (("train step (forward + flow loss + backward + AdamW)", step, trains),
                               ("forward only (encode + decoder velocity, no grad)", forward, forwards)):
        ms = interleaved({n: fn for n in arounds}, arounds, args.steps, args.warmup)
        print(f"{title}: median of {args.steps} interleaved steps after {args.warmup}")
        for name, v in ms.items():
            print(f"  {name:14s} {v / 1000:7.3f} s/step   {v / ms['sdpa']:5.2f}x sdpa")
        roof = Roofline()
        print("  " + roof.line(f"{title.split(' (')[0]}, sdpa", roof.count(fn), ms["sdpa"] / 1000))


def decode_bench(args) -> None:
    model = small_flextok().eval()
    b = args.decode_batch
    x = torch.randn(b, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    ids = model.encode(x)
    runs = {f"k={k}, CFG 7.5 APG": (k, README_GUIDANCE) for k in (1, 16, REGISTERS)}
    runs[f"k={REGISTERS}, no guidance"] = (REGISTERS, None)

    def run(k, guidance):
        return lambda: model.decode(ids, num_tokens=k, steps=args.decode_steps, guidance=guidance, seed=0)

    times = {name: [] for name in runs}
    with torch.no_grad():
        for i in range(args.decode_warmup + args.decode_repeats):
            for name, (k, guidance) in runs.items():
                ms = timed_ms(run(k, guidance), 1, 0)[0]
                if i >= args.decode_warmup:
                    times[name].append(ms / b)
    print(f"decode, {args.decode_steps} Euler steps, batch {b}, per image, median of {args.decode_repeats} "
          f"interleaved runs after {args.decode_warmup}:")
    base = statistics.median(times[f"k={REGISTERS}, CFG 7.5 APG"])
    for name, v in times.items():
        med = statistics.median(v)
        print(f"  {name:22s} {med / 1000:7.3f} s/image   {med / base:5.2f}x k={REGISTERS} CFG")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed train steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--decode-repeats", type=int, default=2)
    p.add_argument("--decode-warmup", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_train:
        train_bench(args)
    if not args.skip_decode:
        decode_bench(args)


if __name__ == "__main__":
    main()
