"""Write tests/fixtures/official_keys/{dit_tiny,flextok_tiny,llamagen_gpt_tiny,llamagen_vq_tiny,
fqgan_dual_f16,fqgan_triple_f16,far_dual_tiny,far_triple_tiny}.json: the official state-dict key names and shapes at the tiny sizes
of vtok's ``dit-tiny``, ``flextok-tiny``, ``gpt-tiny`` and ``vqgan-tiny`` registry entries (FQGAN:
at the released size, see below), read from the official model classes (instantiated on CPU from a
checkout; nothing is downloaded).

    python tools/official_keys.py --dit DIT_CHECKOUT --flextok ML_FLEXTOK_CHECKOUT \
        --llamagen LLAMAGEN_CHECKOUT --fqgan FQGAN_CHECKOUT [--out DIR]

DIT_CHECKOUT: a facebookresearch/DiT checkout (needs timm); its ``models.DiT`` is built with
depth 2, width 64, 4 heads, patch 2, 8x8x4 latents, 24 classes, learned sigma.

ML_FLEXTOK_CHECKOUT: an apple/ml-flextok checkout (the directory holding the ``flextok`` package).
The released models are composed from hydra configs kept in the HF repos, which are not in the code
repository; this script composes the same classes directly, with the module names the official
wrapper indexes (enc_register_module, dec_nested_dropout) and, for the others, the names quoted
from the released config by public forks (see vtok/importers/flextok.py). Only modules holding
weights are built (packers, unpackers and channel moves have none). ``mup`` (muP initialisation
only) and ``hydra`` (config loading) are replaced by stubs when not installed. The bundled
VAE (``vae.*``) is not listed: the importer leaves it out. Settings: encoder and decoder depth 2,
width 64, head dim 32, mlp_ratio 4 (GatedMlp takes int(2/3 x 4D) = int(8D/3) hidden units), 16
registers, FSQ dim 4, 2x2 patches of 8x8x4 latents; decoder blocks with adaLN_expansion 2
(patches / registers); decoder register positions as a learned 1D PositionalEmbeddingAdder (the
type is assumed); the CFG null condition as ``dec_latent_dropout``, a LearnedNullCond over the
decoder width (name and class from a fork quoting the released config's module order; assumed).

LLAMAGEN_CHECKOUT: a FoundationVision/LlamaGen checkout; its ``autoregressive/models/gpt.py``
``Transformer`` is built c2i with gpt-tiny's size (width 128, 4 layers, 4 heads, 16,384 codes, 24
classes, an 8x8 token grid); its ``tokenizer/tokenizer_image/vq_model.py`` ``VQModel`` at vqgan-tiny's
size (``VQModel`` fixes the CNN width at 128 and 2 res blocks, so its encoder and decoder are rebuilt
from the same module's ``Encoder`` / ``Decoder`` with ch 32, ch_mult (1, 2, 2), 1 res block, z 32;
codebook 256 x 8).

FQGAN_CHECKOUT: a showlab/FQGAN checkout (needs einops); ``tokenizer/vq_model_dual.py`` /
``vq_model_triple.py`` ``VQ_16(with_clip_supervision=True)``, built on the meta device: their factor
adapters hard-code width 512 and a 256 px grid, so no tiny official build exists; the fixtures list
the released FQGAN-Dual / Triple x16 layout (shapes only, no weights). Its
``autoregressive/models/far_dual.py`` / ``far_triple.py`` ``Transformer`` is built c2i at
far-dual-tiny's / far-triple-tiny's size (gpt-tiny's trunk, 1 head layer).

Each fixture also records the checkout's commit when it is a git checkout, and the FlexTok one the
largest difference between the official sin-cos tables and vtok's reimplementation of their formula
(``vtok.importers.flextok.official_sincos``), which must be 0.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DIT_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                num_classes=24, learn_sigma=True)
FLEXTOK_TINY = dict(width=64, depth=2, head_dim=32, registers=16, code_dim=4, channels=4, latent=8, patch=2)


def commit_of(path: Path, given: str = "") -> str:
    """The checkout's git commit (``given`` wins: for a ``git archive`` export, which has no .git)."""
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def dit_keys(checkout: Path, commit: str = "") -> dict:
    sys.path.insert(0, str(checkout))
    try:
        import models  # facebookresearch/DiT models.py
    finally:
        sys.path.pop(0)
    model = models.DiT(**DIT_TINY)
    return {"source": "facebookresearch/DiT models.py (class DiT)", "commit": commit_of(checkout, commit),
            "official_config": DIT_TINY, "vtok_arch": "dit-tiny", "keys": shapes(model)}


LLAMAGEN_GPT_TINY = dict(dim=128, n_layer=4, n_head=4, vocab_size=16384, num_classes=24, block_size=64,
                         cls_token_num=1, model_type="c2i")


def checkout_module(checkout: Path, name: str):
    """The module ``name`` (e.g. ``autoregressive.models.gpt``) of a LlamaGen / FQGAN checkout, loaded from
    its file under a name unique to the checkout (both repositories have ``autoregressive.models``);
    their ``from utils.drop_path import DropPath`` resolves against the checkout's root."""
    import importlib.util

    key = f"official_{abs(hash(str(checkout)))}_{name.replace('.', '_')}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, checkout / (name.replace(".", "/") + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(checkout))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    sys.modules[key] = module
    return module


def llamagen_gpt_keys(checkout: Path, commit: str = "") -> dict:
    gpt = checkout_module(checkout, "autoregressive.models.gpt")
    model = gpt.Transformer(gpt.ModelArgs(**LLAMAGEN_GPT_TINY))
    return {"source": "FoundationVision/LlamaGen autoregressive/models/gpt.py (class Transformer, c2i)",
            "commit": commit_of(checkout, commit), "official_config": LLAMAGEN_GPT_TINY, "vtok_arch": "gpt-tiny",
            "keys": shapes(model)}


LLAMAGEN_VQ_TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=256,
                        codebook_embed_dim=8)


def llamagen_vq(checkout: Path) -> nn.Module:
    """LlamaGen's ``VQModel`` at vqgan-tiny's size (see the module docstring)."""
    vq = checkout_module(checkout, "tokenizer.tokenizer_image.vq_model")
    t = LLAMAGEN_VQ_TINY
    cnn = dict(ch=t["ch"], ch_mult=t["ch_mult"], num_res_blocks=t["num_res_blocks"], z_channels=t["z_channels"])
    model = vq.VQModel(vq.ModelArgs(codebook_size=t["codebook_size"], codebook_embed_dim=t["codebook_embed_dim"],
                                    encoder_ch_mult=list(t["ch_mult"]), decoder_ch_mult=list(t["ch_mult"]),
                                    z_channels=t["z_channels"]))
    model.encoder, model.decoder = vq.Encoder(**cnn), vq.Decoder(**cnn)
    return model


def llamagen_vq_keys(checkout: Path, commit: str = "") -> dict:
    return {"source": "FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py (class VQModel; Encoder / "
                      "Decoder at a tiny width)", "commit": commit_of(checkout, commit),
            "official_config": LLAMAGEN_VQ_TINY, "vtok_arch": "vqgan-tiny", "keys": shapes(llamagen_vq(checkout))}


def fqgan_model(checkout: Path, triple: bool, device: str = "meta") -> nn.Module:
    """FQGAN's VQ_16 with feature-prediction heads (Dual or Triple), its construction prints silenced."""
    import contextlib
    import io

    mod = checkout_module(checkout, "tokenizer.vq_model_triple" if triple else "tokenizer.vq_model_dual")
    with torch.device(device), contextlib.redirect_stdout(io.StringIO()):
        return mod.VQ_16(with_clip_supervision=True)


def fqgan_keys(checkout: Path, commit: str = "", triple: bool = False) -> dict:
    name = "triple" if triple else "dual"
    return {"source": f"showlab/FQGAN tokenizer/vq_model_{name}.py (VQ_16, with_clip_supervision=True; meta device)",
            "commit": commit_of(checkout, commit), "official_config": {"model": "VQ-16", "with_clip_supervision": True},
            "vtok_arch": f"fqgan-{name}-f16", "keys": shapes(fqgan_model(checkout, triple))}


def far_model(checkout: Path, triple: bool, device: str = "cpu") -> nn.Module:
    """FQGAN's FAR at far-{dual,triple}-tiny's size, its construction prints silenced."""
    import contextlib
    import io

    mod = checkout_module(checkout, "autoregressive.models.far_triple" if triple else "autoregressive.models.far_dual")
    with torch.device(device), contextlib.redirect_stdout(io.StringIO()):
        return mod.Transformer(mod.ModelArgs(**FAR_TINY))


FAR_TINY = {**LLAMAGEN_GPT_TINY, "ar_n_layer": 1}


def far_keys(checkout: Path, commit: str = "", triple: bool = False) -> dict:
    name = "triple" if triple else "dual"
    return {"source": f"showlab/FQGAN autoregressive/models/far_{name}.py (class Transformer, c2i)",
            "commit": commit_of(checkout, commit), "official_config": FAR_TINY, "vtok_arch": f"far-{name}-tiny",
            "keys": shapes(far_model(checkout, triple))}


def _stub_mup() -> None:
    try:
        import mup  # noqa: F401
        return
    except ImportError:
        pass
    mup = types.ModuleType("mup")
    layer = types.ModuleType("mup.layer")
    init = types.ModuleType("mup.init")

    class MuReadout(nn.Linear):  # same parameters as the real one; only its forward scaling differs
        def __init__(self, *args, readout_zero_init=False, output_mult=1.0, **kwargs):
            super().__init__(*args, **kwargs)

    layer.MuReadout = MuReadout
    init.xavier_uniform_, init.trunc_normal_, init.normal_ = (nn.init.xavier_uniform_, nn.init.trunc_normal_,
                                                              nn.init.normal_)
    mup.layer, mup.init = layer, init
    sys.modules.update({"mup": mup, "mup.layer": layer, "mup.init": init})


def _stub_hydra() -> None:
    """flextok.utils imports hydra's ``instantiate`` (for loading configs, unused here)."""
    try:
        import hydra.utils  # noqa: F401
        return
    except ImportError:
        pass
    hydra, utils = types.ModuleType("hydra"), types.ModuleType("hydra.utils")

    def instantiate(*args, **kwargs):
        raise RuntimeError("hydra is stubbed by tools/official_keys.py")

    utils.instantiate, hydra.utils = instantiate, utils
    sys.modules.update({"hydra": hydra, "hydra.utils": utils})


def flextok_keys(checkout: Path, commit: str = "") -> dict:
    _stub_mup()
    _stub_hydra()
    sys.path.insert(0, str(checkout))
    try:
        from flextok.model.postprocessors.heads import LinearHead, ToPatchesLinearHead
        from flextok.model.preprocessors.linear import LinearLayer
        from flextok.model.preprocessors.nullcond import LearnedNullCond
        from flextok.model.preprocessors.patching import PatchEmbedder
        from flextok.model.preprocessors.registers import Registers1D
        from flextok.model.preprocessors.time_embedding import TimestepEmbedder
        from flextok.model.preprocessors.token_dropout import MaskedNestedDropout
        from flextok.model.trunks.transformers import FlexTransformer
        from flextok.model.utils.posembs import PositionalEmbeddingAdder
        from flextok.model.utils.wrappers import SequentialModuleDictWrapper
    finally:
        sys.path.pop(0)
    t = FLEXTOK_TINY
    d, g, p, c = t["width"], t["latent"] // t["patch"], t["patch"], t["channels"]
    trunk = dict(dim=d, depth=t["depth"], head_dim=t["head_dim"], mlp_ratio=4.0)
    encoder = SequentialModuleDictWrapper({
        "enc_patch_emb": PatchEmbedder(input_tensor_list_read_key="lat", patches_list_write_key="patches",
                                       n_patches_write_key="n", channels_in=c, dim=d, patch_sizes=[p, p],
                                   flatten_patches=False),
        "enc_posemb_module": PositionalEmbeddingAdder(read_key="patches", write_key="patches", dim=d,
                                                      max_sizes=[g, g], posemb_type="sincos"),
        "enc_register_module": Registers1D(input_tensor_list_read_key="patches", register_sizes_read_write_key="rs",
                                           registers_write_key="reg", dim=d, n_min=t["registers"],
                                           n_max=t["registers"]),
        "enc_transformer": FlexTransformer(input_seq_read_key="seq", output_seq_write_key="seq",
                                           block_mask_read_key="mask", **trunk),
        "enc_to_latents": LinearHead(read_key="reg", write_key="reg", dim=d, dim_out=t["code_dim"],
                                     use_mup_readout=False),
    })
    decoder = SequentialModuleDictWrapper({
        "dec_from_latents": LinearLayer(read_key="q", write_key="q", dim_in=t["code_dim"], dim=d),
        "dec_registers_posemb_module": PositionalEmbeddingAdder(read_key="q", write_key="q", dim=d,
                                                                max_sizes=[t["registers"]],
                                                                posemb_type="learnable_sum"),
        "dec_nested_dropout": MaskedNestedDropout(read_write_key="q", dim=d),
        "dec_latent_dropout": LearnedNullCond(read_write_key="q", dim=d),
        "dec_noise_patch_emb": PatchEmbedder(input_tensor_list_read_key="x", patches_list_write_key="patches",
                                             n_patches_write_key="n", channels_in=c, dim=d, patch_sizes=[p, p],
                                   flatten_patches=False),
        "dec_patches_posemb_module": PositionalEmbeddingAdder(read_key="patches", write_key="patches", dim=d,
                                                              max_sizes=[g, g], posemb_type="sincos"),
        "dec_time_embedder": TimestepEmbedder(timesteps_read_key="t", time_embedding_write_key="temb", dim=d),
        "dec_transformer": FlexTransformer(input_seq_read_key="seq", output_seq_write_key="seq",
                                           block_mask_read_key="mask", adaLN_emb_read_key="temb",
                                           adaLN_packing_fn_read_key="pack", adaLN_expansion=2, **trunk),
        "dec_to_patches": ToPatchesLinearHead(read_key="patches", write_key="out", dim=d, channels_out=c,
                                              patch_sizes=[p, p], use_mup_readout=False,
                                              adaLN_emb_read_key="temb"),
    })
    whole = nn.Module()
    whole.encoder, whole.decoder = encoder, decoder
    from vtok.importers.flextok import official_sincos

    state = whole.state_dict()
    sincos_diff = max(float((state[k].float() - official_sincos(d, g, g)).abs().max())
                      for k in state if k.endswith("posemb_module.posembs") and "registers" not in k)
    return {"source": "apple/ml-flextok flextok/model (classes composed as the released config; module "
                      "names partly assumed, see tools/official_keys.py)",
            "commit": commit_of(checkout, commit), "official_config": t, "vtok_arch": "flextok-tiny",
            "sincos_max_diff_vs_vtok_formula": sincos_diff, "keys": shapes(whole)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", default="", help="facebookresearch/DiT checkout (default: skip DiT)")
    ap.add_argument("--flextok", default="", help="apple/ml-flextok checkout (default: skip FlexTok)")
    ap.add_argument("--llamagen", default="", help="FoundationVision/LlamaGen checkout (default: skip LlamaGen)")
    ap.add_argument("--llamagen-commit", default="", help="commit of --llamagen when it is not a git checkout "
                    "(default: ask git)")
    ap.add_argument("--fqgan", default="", help="showlab/FQGAN checkout (default: skip FQGAN)")
    ap.add_argument("--fqgan-commit", default="", help="commit of --fqgan when it is not a git checkout "
                    "(default: ask git)")
    ap.add_argument("--dit-commit", default="", help="commit of --dit when it is not a git checkout "
                    "(default: ask git)")
    ap.add_argument("--flextok-commit", default="", help="commit of --flextok when it is not a git checkout "
                    "(default: ask git)")
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/official_keys"), help="fixture directory")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    for name, checkout, commit, fn in (("dit_tiny", args.dit, args.dit_commit, dit_keys),
                                       ("flextok_tiny", args.flextok, args.flextok_commit, flextok_keys),
                                       ("llamagen_gpt_tiny", args.llamagen, args.llamagen_commit, llamagen_gpt_keys),
                                       ("llamagen_vq_tiny", args.llamagen, args.llamagen_commit, llamagen_vq_keys),
                                       ("fqgan_dual_f16", args.fqgan, args.fqgan_commit, fqgan_keys),
                                       ("fqgan_triple_f16", args.fqgan, args.fqgan_commit,
                                        partial(fqgan_keys, triple=True)),
                                       ("far_dual_tiny", args.fqgan, args.fqgan_commit, far_keys),
                                       ("far_triple_tiny", args.fqgan, args.fqgan_commit, partial(far_keys, triple=True))):
        if not checkout:
            continue
        data = fn(Path(checkout).resolve(), commit)
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"{out / name}.json: {len(data['keys'])} keys")


if __name__ == "__main__":
    main()
