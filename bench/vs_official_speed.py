#!/usr/bin/env python
"""vtok against LlamaGen's own code on the same weights, timed in one run: AR sampling.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/vs_official_speed.py --llamagen LLAMAGEN_CHECKOUT [--rounds 3] [--repeats 3]

LlamaGen's ``autoregressive/models/generate.py`` ``generate`` (prefill + KV-cache decode, CFG as two
batch halves, multinomial sampling, no torch.compile) against vtok's ``GPT.generate`` on the same
weights (the official c2i ``Transformer``, 768 wide x 4 layers, 12 heads, vocab 16,384, 16x16 = 256
tokens, mapped by ``vtok import llamagen-gpt``'s key mapping), at batch 1 and 8, cfg 1.0 and 2.0,
top-k 0, top-p 1, temperature 1. Each (batch, cfg) case is timed in ``--rounds`` interleaved rounds of
``--repeats`` calls after one warm-up call per side; the medians and the speed-up official / vtok are
printed (the issue's target: >= 1.5x). fp32, the threads torch picks (pin with OMP_NUM_THREADS).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_pair(checkout: Path, dim: int, depth: int, heads: int):
    """(official Transformer, vtok GPT) holding the same random weights, eval mode."""
    from tools.official_keys import checkout_module
    from vtok.importers import get_importer
    from vtok.models.generators import GPT, GPTConfig

    gpt = checkout_module(checkout, "autoregressive.models.gpt")
    off = gpt.Transformer(gpt.ModelArgs(dim=dim, n_layer=depth, n_head=heads, vocab_size=16384, num_classes=1000,
                                        block_size=256, cls_token_num=1, model_type="c2i")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in off.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ours = GPT(GPTConfig(dim=dim, depth=depth, heads=heads, prefix_rope="zero", dropout=0.0, token_dropout=0.0))
    ours.load_state_dict(get_importer("llamagen-gpt").to_vtok(off.state_dict(), ours))
    return off, ours.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llamagen", required=True, help="FoundationVision/LlamaGen checkout")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    ap.add_argument("--cfgs", default="1.0,2.0", help="comma-separated CFG scales (default: 1.0,2.0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from tools.official_keys import checkout_module
    from vtok.models.api import Condition

    checkout = Path(args.llamagen).resolve()
    generate = checkout_module(checkout, "autoregressive.models.generate").generate
    torch.backends.cuda.sdp_kernel = lambda **kw: nullcontext()  # deprecated in newer torch; CPU: no-op
    off, ours = build_pair(checkout, args.dim, args.depth, args.heads)
    print(f"GPT {args.dim}w x {args.depth} layers, 256 tokens, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.repeats} calls")
    print(f"{'batch':>5} {'cfg':>4} {'LlamaGen s':>11} {'vtok s':>8} {'speed-up':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        labels = torch.arange(batch) % 1000
        for cfg in (float(c) for c in args.cfgs.split(",")):
            def official(seed: int) -> None:
                torch.manual_seed(seed)
                generate(off, labels, 256, cfg_scale=cfg, temperature=1.0, top_k=0, top_p=1.0)

            def vtok(seed: int) -> None:
                ours.generate(Condition(labels=labels), guidance=cfg, generator=torch.Generator().manual_seed(seed))

            times = {"official": [], "vtok": []}
            with torch.inference_mode():
                official(0), vtok(0)  # warm-up
                for r in range(args.rounds):
                    for name, fn in (("official", official), ("vtok", vtok)) if r % 2 == 0 else (
                            ("vtok", vtok), ("official", official)):
                        for i in range(args.repeats):
                            t0 = time.perf_counter()
                            fn(i)
                            times[name].append(time.perf_counter() - t0)
            a, b = statistics.median(times["official"]), statistics.median(times["vtok"])
            print(f"{batch:>5} {cfg:>4g} {a:>11.3f} {b:>8.3f} {a / b:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
