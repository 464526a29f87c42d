#!/usr/bin/env python
"""DiT-S/2 train step and sampling speed of vtok's DiT, against the official DiT code.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/dit_step.py \
        [--official DIR]

1. Train step (forward + loss + backward + AdamW 1e-4, no clip; fp32, 2 threads) on 8x8x4 latents,
   batch 8, class-conditional with 10% label dropout, median over --steps after --warmup:
   * vtok DiT-S/2 with vtok's DDPM (epsilon + learned sigma, hybrid loss mse + vb), the objective of
     the official number;
   * vtok DiT-S/2 with the rectified-flow objective (learn_sigma off, as ``vtok.tasks.dit`` builds it);
   * the first row again with the per-tensor (unfused) AdamW the official code uses (informational:
     ``vtok.train.optim.build_adamw``, which the vtok rows use, picks torch's fused kernel);
   * the official ``DiT_S_2`` with its own ``create_diffusion(timestep_respacing="")`` when ``--official
     DIR`` names a directory holding the official repo's ``models.py`` and ``diffusion/`` (a clone of
     facebookresearch/DiT; needs timm). Without ``diffusion/`` there the two models are compared with
     plain MSE on their whole 8-channel output; without ``--official`` vtok is compared with the
     recorded figure of ../shared/BASELINES.md. The output says which.
   The variants are timed in interleaved rounds (one step of each per round), so drift of a shared
   machine hits them alike. Target: vtok / official <= 0.8.
2. Sampling steps/s of vtok's DiT-S/2 (eval, no grad) at --sample-batch: guidance off, CFG with the
   conditional and null rows batched in one forward (``guided``), and CFG as two forwards (the naive
   baseline), one Euler step of the rectified flow each.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from roofline import Roofline  # same directory
import torch.nn.functional as F

from vtok.models.api import Condition
from vtok.models.diffusion import GaussianDiffusion, RectifiedFlow
from vtok.models.diffusion.guidance import cfg_combine
from vtok.config.schema import OptimConfig
from vtok.models.registry import MODELS, build_model
from vtok.train.optim import build_adamw

RECORDED = (0.154, 0.168)  # ../shared/BASELINES.md: official DiT-S/2 train step, s (same config)
LATENT, CHANNELS, CLASSES = 8, 4, 1000


def expected_params() -> int:
    """DiT-S/2's published count is for 32x32x4 latents (256 patches); at 8x8 there are 16 patches,
    and only the frozen positional table (patches x width) depends on the grid."""
    cfg = MODELS["dit-s-2"].config
    return MODELS["dit-s-2"].params - ((32 // 2) ** 2 - (LATENT // 2) ** 2) * cfg.hidden


def load_official(directory: str):
    """(DiT_S_2, create_diffusion or None) from a directory holding the official repo's files,
    imported from that path (nothing of it lives in vtok)."""
    root = Path(directory).expanduser().resolve()
    spec = importlib.util.spec_from_file_location("dit_official_models", root / "models.py")
    if spec is None or not (root / "models.py").is_file():
        raise SystemExit(f"--official {directory}: no models.py there (a clone of facebookresearch/DiT)")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    create = None
    if (root / "diffusion" / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location("dit_official_diffusion", root / "diffusion" / "__init__.py",
                                                      submodule_search_locations=[str(root / "diffusion")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package  # its relative imports resolve through sys.modules
        spec.loader.exec_module(package)
        create = package.create_diffusion
    return models.DiT_S_2, create


def batch(args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, CHANNELS, LATENT, LATENT, generator=g)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g)
    t_ddpm = torch.randint(0, 1000, (args.batch,), generator=g)
    return x, y, t_ddpm


def vtok_step(args, objective: str, fused: bool | None = None):
    """(step, model): one training step of vtok's DiT-S/2 with ``objective`` "ddpm" | "flow" | "mse",
    AdamW as vtok's trainer builds it (``fused`` None: the fused kernel; False: the per-tensor loop)."""
    torch.manual_seed(0)
    model = build_model("dit-s-2", token_mode="2d", in_channels=CHANNELS, input_size=LATENT, num_classes=CLASSES,
                        class_dropout=0.1, learn_sigma=objective != "flow").train()
    opt = build_adamw([model], OptimConfig(lr=1e-4, weight_decay=0.0), fused=fused)
    x, y, t_ddpm = batch(args)
    cond = Condition(labels=y)
    if objective == "ddpm":
        process = GaussianDiffusion(num_timesteps=1000, learn_sigma=True, vb_weight=1.0, channel_dim=model.channel_dim)
        net, t = model.diffusion_net(learned_sigma=True), t_ddpm
    elif objective == "flow":
        process, net = RectifiedFlow(), model.diffusion_net()
        t = process.time_from_normal(torch.randn(args.batch, generator=torch.Generator().manual_seed(1)))

    def step():
        if objective == "mse":
            noise = torch.randn_like(x)
            loss = F.mse_loss(model(x + noise, cond, t_ddpm), torch.cat([noise, noise], 1))
        else:
            loss, _ = process.loss(net, x, cond, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def official_step(args, dit_s_2, create_diffusion):
    """(step, model): the official DiT-S/2 trained as its train.py does (plain MSE without ``diffusion/``)."""
    torch.manual_seed(0)
    model = dit_s_2(input_size=LATENT, in_channels=CHANNELS, num_classes=CLASSES, learn_sigma=True,
                    class_dropout_prob=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x, y, t = batch(args)
    diffusion = create_diffusion(timestep_respacing="") if create_diffusion is not None else None

    def step():
        if diffusion is not None:
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        else:
            noise = torch.randn_like(x)
            loss = F.mse_loss(model(x + noise, t, y), torch.cat([noise, noise], 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def interleaved_ms(steps: dict, n: int, warmup: int) -> dict[str, float]:
    """Median ms per step of every callable, timed one step of each per round after ``warmup`` rounds."""
    times = {k: [] for k in steps}
    for i in range(warmup + n):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def sampling(args) -> dict[str, float]:
    """Euler steps/s of the rectified flow sampler at --sample-batch, three ways."""
    torch.manual_seed(0)
    model = build_model("dit-s-2", token_mode="2d", in_channels=CHANNELS, input_size=LATENT,
                        num_classes=CLASSES, learn_sigma=False).eval()
    for p in model.parameters():  # a fresh DiT predicts exactly 0 (zeroed output layers): give it weights
        torch.nn.init.normal_(p, std=0.02)
    b = args.sample_batch
    x = torch.randn(b, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(b) % CLASSES
    cond, null = Condition(labels=labels), model.null_condition(b)
    t, dt, net = torch.full((b,), 0.5), 1.0 / args.sample_steps, model.diffusion_net()

    def off():
        x.sub_(dt * net(x, t, cond))

    def batched():
        x.sub_(dt * model.guided_prediction(x, cond, t, args.cfg))

    def two_forwards():
        x.sub_(dt * cfg_combine(net(x, t, cond), net(x, t, null), args.cfg))

    with torch.no_grad():
        x0 = x.clone()
        same = torch.allclose(model.guided_prediction(x0, cond, t, args.cfg),
                              cfg_combine(net(x0, t, cond), net(x0, t, null), args.cfg), atol=1e-5, rtol=1e-4)
        assert same, "batched and two-forward CFG must agree"
        ms = interleaved_ms({"off": off, "batched": batched, "two": two_forwards}, args.sample_repeats, args.warmup)
    return {k: 1000 / v for k, v in ms.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", default="", help="directory with the official DiT repo's models.py (+ diffusion/)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (BASELINES.md: 2)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=50, help="Euler step size 1 / this (the work per step is fixed)")
    p.add_argument("--sample-repeats", type=int, default=30)
    p.add_argument("--cfg", type=float, default=4.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    steps, params = {}, {}
    official, create = load_official(args.official) if args.official else (None, None)
    for objective in ("ddpm", "flow") if official is None or create is not None else ("mse", "flow"):
        steps[f"vtok {objective}"], model = vtok_step(args, objective)
        params[f"vtok {objective}"] = sum(q.numel() for q in model.parameters())
    main_objective = next(iter(steps)).split()[1]
    steps[f"vtok {main_objective} unfused"], _ = vtok_step(args, main_objective, fused=False)
    params[f"vtok {main_objective} unfused"] = params[f"vtok {main_objective}"]
    if official is not None:
        name = "official ddpm" if create is not None else "official mse"
        steps[name], model = official_step(args, official, create)
        params[name] = sum(q.numel() for q in model.parameters())

    print(f"DiT-S/2 train step on {LATENT}x{LATENT}x{CHANNELS} latents, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, AdamW 1e-4: median of {args.steps} interleaved steps after {args.warmup}")
    ms = interleaved_ms(steps, args.steps, args.warmup)
    want = expected_params()
    for name, v in ms.items():
        note = ""
        if "flow" not in name:
            note = "  (= expected)" if params[name] == want else f"  (!= expected {want:,})"
        if name.endswith("unfused"):
            note = "  (per-tensor AdamW as the official code; vtok.train uses the fused kernel)"
        print(f"  {name:20s} {v / 1000:7.3f} s/step   {params[name]:>12,} params{note}")
    roof = Roofline()
    for name, v in ms.items():
        print(roof.line(name, roof.count(steps[name]), v / 1000))
    vtok_name = f"vtok {main_objective}"
    flow, fused = ms["vtok flow"], ms[f"vtok {main_objective} unfused"]
    if official is not None:
        base_name = next(k for k in ms if k.startswith("official"))
        base = ms[base_name]
        what = ("vtok DDPM vs official DDPM (learned sigma, hybrid loss), both built and timed in this run"
                if create is not None else "plain MSE on the 8-channel output for both (no official diffusion/), "
                                           "both built and timed in this run")
        ratio = ms[vtok_name] / base
        print(f"baseline: {what}")
        print(f"  {vtok_name} / {base_name}: {ratio:.2f}x (target <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})"
              f"   vtok flow / {base_name}: {flow / base:.2f}x")
        print(f"  {vtok_name} unfused AdamW / {base_name}: {fused / base:.2f}x")
    else:
        lo, hi = RECORDED
        v = ms[vtok_name] / 1000
        print(f"baseline: the recorded official figure {lo}-{hi} s/step (../shared/BASELINES.md, another run; "
              "pass --official DIR to time the official model in this run)")
        print(f"  {vtok_name} / recorded: {v / hi:.2f}-{v / lo:.2f}x (target <= 0.8 against the fast end: "
              f"{'met' if v <= 0.8 * lo else 'NOT met'})   vtok flow / recorded: {flow / 1000 / hi:.2f}-"
              f"{flow / 1000 / lo:.2f}x")
        print(f"  {vtok_name} unfused AdamW / recorded: {fused / 1000 / hi:.2f}-{fused / 1000 / lo:.2f}x")

    rate = sampling(args)
    print(f"sampling, vtok DiT-S/2 eval, batch {args.sample_batch}, one Euler step = one guided prediction, "
          f"cfg {args.cfg}, median of {args.sample_repeats} interleaved steps after {args.warmup}:")
    print(f"  guidance off              : {rate['off']:7.1f} steps/s")
    print(f"  CFG, one batched forward  : {rate['batched']:7.1f} steps/s   {rate['batched'] / rate['off']:.2f}x off")
    print(f"  CFG, two forwards (naive) : {rate['two']:7.1f} steps/s   {rate['two'] / rate['off']:.2f}x off")
    print(f"  batched / two forwards    : {rate['batched'] / rate['two']:.2f}x")


if __name__ == "__main__":
    main()
