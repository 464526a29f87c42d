"""Equivalence of ``vtok import`` with the official implementations, on random weights (CPU, tiny).

    python bench/vs_official.py [--dit DIT_CHECKOUT] [--flextok ML_FLEXTOK_CHECKOUT] \
        [--llamagen LLAMAGEN_CHECKOUT] [--fqgan FQGAN_CHECKOUT [--skip-fqgan-tokenizers]] [--json OUT]

DiT (facebookresearch/DiT checkout, needs timm): builds the official ``models.DiT`` at dit-tiny's
size, fills EVERY parameter with random values (the official init zeroes adaLN and the output
layer, which would make any comparison trivially pass), saves it as a train.py-style checkpoint
``{"model", "ema", "args"}``, runs ``vtok import dit`` on it (the real command, EMA entry), loads the
export with ``load_export`` and compares both models' outputs for the same (x_t, t, y): float32,
eval mode, integer DDPM steps, learned-sigma channels included, the null class included; then one
guided ancestral step as DiT's sample.py takes it (``create_diffusion("250")``, ``forward_with_cfg``).

LlamaGen (FoundationVision/LlamaGen checkout): the c2i GPT at gpt-tiny's size (teacher-forced logits;
greedy generation through both KV caches) and the VQ at vqgan-tiny's size (codes; decoded images).
FQGAN (showlab/FQGAN checkout, needs einops): the Dual and Triple tokenizers at the released size
(their adapters hard-code it; float64: codes, decoded images, feature heads; ~1 min, 8 GB) and FAR
dual / triple at tiny sizes (logits of every sub-code; top-1 generation through ``generate_fq``).
Each goes through the real ``vtok import`` command on a checkpoint saved as the official training
script saves it.

FlexTok (apple/ml-flextok checkout; ``mup`` / ``hydra`` stubbed as in tools/official_keys.py): the
official modules are composed at flextok-tiny's widths but with head dim 64 (the released head dim:
the official attention scale is 8 / head_dim, muP-style, which equals vtok's 1 / sqrt(head_dim) only
there), filled with random values, mapped with the importer's ``to_vtok``, and run side by side.
The official trunk runs its blocks with the SDPA path and a dense boolean mask (its FlexAttention
``BlockMask`` packing is replaced by the same prefix-LM / full masks); every module holding weights
is the official one. Compared: the encoder's pre-quantisation register codes, and the decoder's
velocity for all registers kept (keep_k = R) and for a prefix (keep_k < R, where the two differ by
design: see vtok.importers.flextok.NOTES). The sinusoidal time features differ by float32 rounding
(the official code multiplies the frequencies by 1000, vtok the time): the decoder is compared both
with each side's own features (reported, not required) and with the same features (required).

Prints one line per check and exits 1 when a check that must match (max abs diff < 1e-5) does not.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOL = 1e-5


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def dit_check(checkout: Path, work: Path) -> dict[str, float]:
    from vtok.cli import main
    from vtok.models.api import Condition
    from vtok.models.export import load_export

    sys.path.insert(0, str(checkout))
    import models  # facebookresearch/DiT
    sys.path.pop(0)
    off = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                     num_classes=24, learn_sigma=True)
    randomise(off, 0)
    ckpt = work / "dit_train.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in off.state_dict().items()}, "ema": off.state_dict(),
                "args": argparse.Namespace(model="DiT-tiny")}, ckpt)
    if main(["import", "dit", str(ckpt), "--out", str(work / "dit_export")]) != 0:
        raise SystemExit("vtok import dit failed")
    ours = load_export(work / "dit_export").model.eval()  # float32: DiT's time embedding is float32 only
    off = off.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    y = torch.tensor([0, 3, 7, 23, 24, 11])  # 24 = the null class (CFG)
    with torch.no_grad():
        a = off(x, t, y)
        b = ours(x, Condition(labels=y), t)
    result = {"dit forward (x_t, t, y), 8 of 8 output channels": float((a - b).abs().max())}
    result.update(dit_guided_step(checkout, off, load_export(work / "dit_export")))
    return result


def dit_guided_step(checkout: Path, off: torch.nn.Module, export) -> dict[str, float]:
    """One guided ancestral step as sample.py takes it: ``create_diffusion("250")``'s ``p_mean_variance``
    of ``forward_with_cfg`` (cfg 4: guidance on 3 of the 4 latent channels), against vtok's DDPM built
    from the export's recorded process, respaced to 250 steps: the mean and log-variance of
    p(x_{t-1} | x_t) at the first, a middle and the last step."""
    from vtok.models.api import Condition
    from vtok.models.diffusion import Guidance
    from vtok.models.diffusion.ddpm import GaussianDiffusion

    sys.path.insert(0, str(checkout))
    from diffusion import create_diffusion  # facebookresearch/DiT
    sys.path.pop(0)
    ours, info = export.model, export.meta["diffusion"]
    d_off = create_diffusion("250")
    d_ours = GaussianDiffusion(num_timesteps=info["num_timesteps"], learn_sigma=info["learn_sigma"], channel_dim=1,
                               guided_channels=info["guided_channels"]).respace("250")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 5, 23])
    result = {}
    with torch.no_grad():
        for i in (249, 125, 0):
            out = d_off.p_mean_variance(off.forward_with_cfg, torch.cat([x, x]), torch.full((6,), i),
                                        clip_denoised=False,
                                        model_kwargs={"y": torch.cat([y, torch.full((3,), 24)]), "cfg_scale": 4.0})
            mine, _ = d_ours._predict(ours.diffusion_net(learned_sigma=True), x, i, Condition(labels=y),
                                      Guidance(scale=4.0), ours.null_condition(3), None)
            diff = max(float((out["mean"][:3] - mine["mean"]).abs().max()),
                       float((out["log_variance"][:3] - mine["log_variance"]).abs().max()))
            result[f"dit guided DDPM step {i} of 250 (cfg 4, 3 channels): mean and log-variance"] = diff
    return result


def llamagen_gpt_check(checkout: Path, work: Path) -> dict[str, float]:
    """LlamaGen's c2i ``Transformer`` at gpt-tiny's size, random weights, saved as train_c2i.py saves
    (``{"model", "optimizer", "steps", "args"}``), through ``vtok import llamagen-gpt``: teacher-forced
    logits, and greedy generation through both KV caches (cfg 1 and 2)."""
    from tools.official_keys import LLAMAGEN_GPT_TINY, checkout_module
    from vtok.cli import main
    from vtok.models.api import Condition
    from vtok.models.export import load_export

    gpt = checkout_module(checkout, "autoregressive.models.gpt")
    gen_mod = checkout_module(checkout, "autoregressive.models.generate")
    from contextlib import nullcontext
    torch.backends.cuda.sdp_kernel = lambda **kw: nullcontext()  # deprecated (or gone) in newer torch; CPU: no-op
    off = gpt.Transformer(gpt.ModelArgs(**LLAMAGEN_GPT_TINY))
    randomise(off, 4)
    ckpt = work / "c2i_tiny_128.pt"  # 128 px / 16 = the 8x8 grid of block_size 64
    torch.save({"model": off.state_dict(), "optimizer": {}, "steps": 1,
                "args": argparse.Namespace(gpt_model="GPT-tiny")}, ckpt)
    if main(["import", "llamagen-gpt", str(ckpt), "--out", str(work / "gpt_export")]) != 0:
        raise SystemExit("vtok import llamagen-gpt failed")
    ours = load_export(work / "gpt_export").model.eval()
    off = off.eval()
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 7, 23, 24])  # 24 = the null class
    codes = torch.randint(0, 16384, (4, 1, 8, 8), generator=g)
    seq = codes.flatten(1)
    result = {}
    with torch.no_grad():
        a, _ = off(seq[:, :-1], labels, input_pos=torch.arange(64))
        b = ours(codes, Condition(labels=labels))[0]
        result["llamagen gpt teacher-forced logits (64 positions)"] = float((a - b).abs().max())
        for cfg in (1.0, 2.0):
            want = gen_mod.generate(off, labels[:3], 64, cfg_scale=cfg, sample_logits=False, temperature=1.0,
                                    top_k=0, top_p=1.0)
            got = ours.generate(Condition(labels=labels[:3]), guidance=cfg, top_k=1).flatten(1)
            result[f"llamagen gpt greedy generate, cfg {cfg:g}: tokens that differ (of {got.numel()})"] = float(
                (want.long() != got).sum())
    return result


def llamagen_vq_check(checkout: Path, work: Path) -> dict[str, float]:
    """LlamaGen's ``VQModel`` at vqgan-tiny's size (tools/official_keys.py), random weights, saved as
    vq_train.py saves with EMA (``{"model", "ema", "optimizer", "discriminator", ...}``), through ``vtok
    import llamagen-vq`` (EMA entry): codes of the same images, and the decoded images of those codes."""
    from tools.official_keys import llamagen_vq
    from vtok.cli import main
    from vtok.models.export import load_export

    off = llamagen_vq(checkout)
    randomise(off, 6)
    ckpt = work / "vq_ds4_tiny.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in off.state_dict().items()}, "ema": off.state_dict(),
                "optimizer": {}, "discriminator": {"conv.weight": torch.zeros(1)}, "steps": 1,
                "args": argparse.Namespace(vq_model="VQ-tiny")}, ckpt)
    if main(["import", "llamagen-vq", str(ckpt), "--out", str(work / "vq_export"), "--image-size", "64"]) != 0:
        raise SystemExit("vtok import llamagen-vq failed")
    ours = load_export(work / "vq_export").model.eval()
    off = off.eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        quant, _, (_, _, indices) = off.encode(x)
        codes = ours.encode(x)
        want = indices.view(4, 1, 16, 16)
        result = {f"llamagen vq codes: tokens that differ (of {codes.numel()})": float((want != codes).sum())}
        a = off.decode_code(indices, shape=(4, 8, 16, 16))
        b = ours.decode(want)
        result["llamagen vq decoded images of the same codes"] = float((a - b).abs().max())
    return result


def fqgan_check(checkout: Path, work: Path, triple: bool = False) -> dict[str, float]:
    """FQGAN's VQ_16 (Dual or Triple, with feature-prediction heads) at the released size (its adapters
    hard-code 512 wide over a 16x16 grid), random weights, saved as vq_train.py saves, through ``vtok
    import fqgan``; both sides then run in float64 on 2 images at 256 px: the codes of every factor,
    the decoded images of those codes, and each feature-prediction head's CLS output."""
    from tools.official_keys import fqgan_model
    from vtok.cli import main
    from vtok.models.export import load_export

    name = "triple" if triple else "dual"
    off = fqgan_model(checkout, triple, device="cpu")
    randomise(off, 8)
    ckpt = work / f"fqgan_{name}.pt"
    torch.save({"model": off.state_dict(), "optimizer": {}, "steps": 1}, ckpt)
    if main(["import", "fqgan", str(ckpt), "--out", str(work / f"fqgan_{name}")]) != 0:
        raise SystemExit("vtok import fqgan failed")
    ckpt.unlink()
    ours = load_export(work / f"fqgan_{name}").model.double().eval()
    off = off.double().eval()
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    label = f"fqgan-{name}"
    with torch.no_grad():
        out = off.encode(x)
        k = 3 if triple else 2
        quants, infos = out[:k], out[k:]
        # official encode returns (sem..., vis) / (vis, mid, high) orders; the decoder order is vis, sem(s)
        order = [1, 0] if not triple else [0, 1, 2]
        want = torch.stack([infos[i][2].view(2, 16, 16) for i in order], 1)
        codes = ours.encode(x)
        result = {f"{label} codes of {k} factors: tokens that differ (of {codes.numel()})": float((want != codes).sum())}
        shape = (2, ours.cfg.vq.dim, 16, 16)
        flat = [infos[i][2] for i in order]
        a = (off.decode_code(flat[1], flat[0], shape, shape) if not triple
             else off.decode_code(flat[0], flat[1], flat[2], shape, shape, shape))
        result[f"{label} decoded images of the same codes"] = float((a - ours.decode(want)).abs().max())
        heads = {1: off.feat_pred_head} if not triple else {1: off.mid_sem_feat_pred, 2: off.high_sem_feat_pred}
        q = [quants[i] for i in order]
        for j, head in heads.items():
            diff = (head(q[j])[:, 0] - ours.align_heads[str(j)](q[j])).abs().max()
            result[f"{label} feature-prediction head {j} (CLS output)"] = float(diff)
    return result


def far_check(checkout: Path, work: Path, triple: bool = False) -> dict[str, float]:
    """FQGAN's FAR (far_dual.py / far_triple.py ``Transformer``) at far-{dual,triple}-tiny's size, random
    weights, through ``vtok import far``: teacher-forced logits of every sub-code, and generation with
    top-k 1 through both samplers (the official ``generate_fq``, cfg 1.5 and 2 on every sub-code; with
    cfg 1 it sizes its KV cache for 2B rows and fails, so its evaluation always guides)."""
    from tools.official_keys import checkout_module, far_model
    from vtok.cli import main
    from vtok.models.api import Condition
    from vtok.models.export import load_export

    name = "triple" if triple else "dual"
    k = 3 if triple else 2
    gen_mod = checkout_module(checkout, f"autoregressive.models.generate_{name}")
    off = far_model(checkout, triple)
    randomise(off, 10)
    ckpt = work / f"far_{name}_tiny_128.pt"  # 128 px / 16 = the 8x8 grid of block_size 64
    torch.save({"model": off.state_dict(), "optimizer": {}, "steps": 1}, ckpt)
    if main(["import", "far", str(ckpt), "--out", str(work / f"far_{name}")]) != 0:
        raise SystemExit("vtok import far failed")
    ours = load_export(work / f"far_{name}").model.eval()
    off = off.eval()
    g = torch.Generator().manual_seed(11)
    labels = torch.tensor([0, 7, 23, 24])  # 24 = the null class
    codes = torch.randint(0, 16384, (4, k, 8, 8), generator=g)
    result = {}
    with torch.no_grad():
        want = off(*codes.flatten(2).unbind(1), labels, input_pos=torch.arange(64))[:k]
        got = ours(codes, Condition(labels=labels))
        for j in range(k):
            result[f"far-{name} teacher-forced logits, sub-code {j}"] = float((want[j] - got[j]).abs().max())
        for cfg in (1.5, 2.0):
            torch.manual_seed(0)
            ref = gen_mod.generate_fq(off, labels[:3], 64, cfg_scale=[cfg] * k, temperature=[1.0] * k, top_k=[1] * k,
                                      top_p=[1.0] * k)
            mine = ours.generate(Condition(labels=labels[:3]), guidance=cfg, top_k=1).flatten(2)
            differ = sum(int((r.long() != mine[:, j]).sum()) for j, r in enumerate(ref))
            result[f"far-{name} top-1 generate, cfg {cfg:g}: tokens that differ (of {mine.numel()})"] = float(differ)
    return result


def _stubs() -> None:
    from tools.official_keys import _stub_hydra, _stub_mup

    _stub_mup()
    _stub_hydra()


def flextok_check(checkout: Path) -> dict[str, float]:
    from vtok.importers import get_importer
    from vtok.importers.flextok import M
    from vtok.models.layers import prefix_lm_mask
    from vtok.models.layers.adaln import timestep_embedding
    from vtok.models.registry import build_model

    _stubs()
    sys.path.insert(0, str(checkout))
    from flextok.model.postprocessors.heads import LinearHead, ToPatchesLinearHead, expand_emb_from_ps
    from flextok.model.preprocessors.flex_seq_packing import expand_emb_per_subseq
    from flextok.model.preprocessors.linear import LinearLayer
    from flextok.model.preprocessors.patching import PatchEmbedder
    from flextok.model.preprocessors.registers import Registers1D
    from flextok.model.preprocessors.time_embedding import TimestepEmbedder
    from flextok.model.preprocessors.token_dropout import MaskedNestedDropout
    from flextok.model.trunks.transformers import FlexTransformer
    from flextok.model.utils.posembs import PositionalEmbeddingAdder
    sys.path.pop(0)

    d, depth, r, code, c, s, p = 64, 2, 16, 4, 4, 8, 2
    g = s // p
    trunk = dict(dim=d, depth=depth, head_dim=64, mlp_ratio=4.0)
    mods = torch.nn.ModuleDict({
        "enc_patch": PatchEmbedder(input_tensor_list_read_key="lat", patches_list_write_key="patches",
                                   n_patches_write_key="n", channels_in=c, dim=d, patch_sizes=[p, p],
                                   flatten_patches=False),
        "enc_pos": PositionalEmbeddingAdder(read_key="patches", write_key="patches", dim=d, max_sizes=[g, g]),
        "enc_reg": Registers1D(input_tensor_list_read_key="patches", register_sizes_read_write_key="rs",
                               registers_write_key="reg", dim=d, n_min=r, n_max=r),
        "enc_tf": FlexTransformer(input_seq_read_key="seq", output_seq_write_key="seq", **trunk),
        "enc_head": LinearHead(read_key="reg", write_key="reg", dim=d, dim_out=code, use_mup_readout=False),
        "dec_codes": LinearLayer(read_key="q", write_key="q", dim_in=code, dim=d),
        "dec_regpos": PositionalEmbeddingAdder(read_key="q", write_key="q", dim=d, max_sizes=[r],
                                               posemb_type="learnable_sum"),
        "dec_mask": MaskedNestedDropout(read_write_key="q", dim=d),
        "dec_patch": PatchEmbedder(input_tensor_list_read_key="x", patches_list_write_key="xp",
                                   n_patches_write_key="n", channels_in=c, dim=d, patch_sizes=[p, p],
                                   flatten_patches=False),
        "dec_pos": PositionalEmbeddingAdder(read_key="xp", write_key="xp", dim=d, max_sizes=[g, g]),
        "dec_time": TimestepEmbedder(timesteps_read_key="t", time_embedding_write_key="temb", dim=d,
                                     max_timestep=1.0),
        "dec_tf": FlexTransformer(input_seq_read_key="seq", output_seq_write_key="seq", adaLN_emb_read_key="temb",
                                  adaLN_packing_fn_read_key="pack", adaLN_expansion=2, **trunk),
        "dec_head": ToPatchesLinearHead(read_key="xp", write_key="out", dim=d, channels_out=c, patch_sizes=[p, p],
                                        use_mup_readout=False, adaLN_emb_read_key="temb"),
    })
    fixed = {k: v.detach().clone() for k, v in mods.state_dict().items() if k in ("enc_pos.posembs", "dec_pos.posembs")}
    randomise(mods, 2)
    mods.load_state_dict({**mods.state_dict(), **fixed})  # the sin-cos tables stay the official formula
    for m in mods.modules():
        if hasattr(m, "use_flex_attention"):
            m.use_flex_attention = False  # SDPA with a dense mask (same math)
    mods = mods.double().eval()
    state = {}
    for short, full in M.items():
        state.update({f"{full}.{k}": v for k, v in mods[short].state_dict().items()} if short in mods else {})
    arch, overrides = get_importer("flextok").recognise(state)  # norm_eps: the official 1e-5
    model = build_model(arch, **overrides, head_dim=64).double().eval()
    imp = get_importer("flextok")
    model.load_state_dict(imp.to_vtok(state, model))

    gen = torch.Generator().manual_seed(3)
    lat = torch.randn(2, c, s, s, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        # official encoder, module by module
        dd = {"lat": [x[None].permute(0, 2, 3, 1) for x in lat]}
        dd = mods["enc_pos"](mods["enc_patch"](dd))
        dd = mods["enc_reg"](dd)
        outs = []
        mask = prefix_lm_mask(g * g, g * g + r, "cpu")
        for patches, regs in zip(dd["patches"], dd["reg"]):
            x = torch.cat([patches.flatten(1, 2), regs], 1)
            for blk in mods["enc_tf"].blocks:
                x = blk(x, block_mask=mask)
            outs.append(mods["enc_head"].forward_default(x[:, g * g:]))
        off_codes = torch.cat(outs)
        our_codes = model.encoder(model.patchify(lat))
        result = {"flextok encoder pre-quantisation codes": float((off_codes - our_codes).abs().max())}

        codes = torch.rand(2, r, code, generator=gen, dtype=torch.float64) * 2 - 1
        x_t = torch.randn(2, c, s, s, generator=gen, dtype=torch.float64)
        t = torch.tensor([0.3, 0.9], dtype=torch.float64)
        te = mods["dec_time"]
        own = te.timestep_embedding(t, 256).double()  # official: t * (1000 * freqs), float32
        shared = timestep_embedding(t.float() * 1000.0, 256, 256).double()  # vtok: (t * 1000) * freqs, float32
        result["flextok time features: official vs vtok order of float32 products (rounding)"] = float(
            (own - shared).abs().max())
        for keep, features, label in ((r, shared, "same time features"), (r, own, "each side's time features"),
                                      (r // 4, shared, "same time features")):
            temb_all = te.mlp(features)
            preds = []
            for i in range(2):
                dd = {"q": [codes[i:i + 1]], "x": [x_t[i:i + 1].permute(0, 2, 3, 1)], "eval_keep_k": [keep]}
                dd = mods["dec_mask"](mods["dec_regpos"](mods["dec_codes"](dd)))
                dd = mods["dec_pos"](mods["dec_patch"](dd))
                temb = temb_all[i:i + 1]
                seq = torch.cat([dd["xp"][0].flatten(1, 2), dd["q"][0]], 1)
                pack = partial(expand_emb_per_subseq, packed_shapes_list=[[torch.Size([g, g]), torch.Size([r])]])
                for blk in mods["dec_tf"].blocks:
                    seq = blk(seq, block_mask=None, adaLN_emb=temb, adaLN_packing_fn=pack)
                out = mods["dec_head"].forward_adaLN(seq[:, :g * g], temb,
                                                     partial(expand_emb_from_ps, ps=[torch.Size([g * g])]))
                out = out.view(1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(1, c, s, s)
                preds.append(out)
            ours = model.velocity(x_t, t, codes, torch.full((2,), keep))[0]
            if features is own:
                key = f"flextok decoder velocity, keep_k={keep} of {r}, {label} (time-feature rounding)"
            else:
                key = f"flextok decoder velocity, keep_k={keep} of {r}, {label}"
            result[key] = float((torch.cat(preds) - ours).abs().max())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", default="", help="facebookresearch/DiT checkout (default: skip DiT)")
    ap.add_argument("--flextok", default="", help="apple/ml-flextok checkout (default: skip FlexTok)")
    ap.add_argument("--llamagen", default="", help="FoundationVision/LlamaGen checkout (default: skip LlamaGen)")
    ap.add_argument("--fqgan", default="", help="showlab/FQGAN checkout (needs einops; default: skip FQGAN)")
    ap.add_argument("--skip-fqgan-tokenizers", action="store_true", help="with --fqgan: only the FAR checks (the "
                    "tokenizers run at the released size: ~1 min and 8 GB)")
    ap.add_argument("--json", default="", help="also write the diffs here (default: none)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.dit:
            results.update(dit_check(Path(args.dit).resolve(), Path(tmp)))
        if args.flextok:
            results.update(flextok_check(Path(args.flextok).resolve()))
        if args.llamagen:
            results.update(llamagen_gpt_check(Path(args.llamagen).resolve(), Path(tmp)))
            results.update(llamagen_vq_check(Path(args.llamagen).resolve(), Path(tmp)))
        if args.fqgan and not args.skip_fqgan_tokenizers:
            results.update(fqgan_check(Path(args.fqgan).resolve(), Path(tmp)))
            results.update(fqgan_check(Path(args.fqgan).resolve(), Path(tmp), triple=True))
        if args.fqgan:
            results.update(far_check(Path(args.fqgan).resolve(), Path(tmp)))
            results.update(far_check(Path(args.fqgan).resolve(), Path(tmp), triple=True))
    failed = False
    for name, diff in results.items():
        must = "by design" not in name and "rounding" not in name
        ok = diff < TOL
        failed |= must and not ok
        what = f"{diff:.0f}" if "tokens that differ" in name else f"max abs diff {diff:.3e}"
        print(f"{name}: {what} ({'ok' if ok else 'DIFFERS' if must else 'expected'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
