"""The README's "Reproducing the papers' numbers" commands, each at small sample size on tiny weights in
the official layouts: vtok import -> vtok eval recon / vtok sample --npz -> vtok eval gen. The
published numbers need the released files, ImageNet and a GPU; these runs prove the commands and
their wiring (a random Inception stands in for the FID network)."""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file
from test_fid import random_inception  # noqa: F401  (fixture)
from test_importers import fqgan_official, official_state

from vtok.cli import main
from vtok.data.synthetic import write_synthetic
from vtok.importers import get_importer
from vtok.models.registry import build_model


def eval_gen(tmp_path, npz, inception, ref, tag: str) -> dict:
    assert main(["eval", "gen", "--samples", str(npz), "--ref", ref, "--inception", inception, "--out",
                 str(tmp_path / tag), "--resolution", "32", "--batch-size", "8", "--max-ref", "8",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    return json.loads((tmp_path / tag / "gen.json").read_text())


def test_fqgan_dual_rfid_then_far_gfid(random_inception, tmp_path):  # noqa: F811
    """FQGAN-Dual rFID / PSNR (import fqgan -> eval recon) and FAR-B gFID (import far --tokenizer ->
    sample --guidance 2 --npz -> eval gen), at 64 px on tiny weights."""
    inception, _ = random_inception
    write_synthetic(tmp_path / "val", "wds", 8, 4, resolution=64, progress=False)
    torch.save({"ema": fqgan_official("fqgan-dual-tiny", seed=20), "steps": 1}, tmp_path / "fqgan_dual.pt")
    assert main(["import", "fqgan", str(tmp_path / "fqgan_dual.pt"), "--out", str(tmp_path / "fqgan")]) == 0
    assert main(["eval", "recon", "--tokenizer", str(tmp_path / "fqgan"), "--data", str(tmp_path / "val"), "--out",
                 str(tmp_path / "recon"), "--resolution", "64", "--batch-size", "8", "--inception", inception,
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    recon = json.loads((tmp_path / "recon" / "recon.json").read_text())
    assert recon["num_images"] == 8 and recon["rfid"] > 0 and np.isfinite(recon["psnr"])

    imp = get_importer("far")
    far = build_model("far-dual-tiny", vocab_sizes=(256, 256), token_shape=(16, 16))  # the tokenizer's 16x16 grid
    official = {k: 0.2 * torch.randn_like(v) for k, v in imp.to_official(far.state_dict(), far).items()}
    save_file(official, str(tmp_path / "far_b_256.safetensors"))  # the name's 256: 256 / 16 = 16x16 tokens
    assert main(["import", "far", str(tmp_path / "far_b_256.safetensors"), "--out", str(tmp_path / "far"),
                 "--tokenizer", str(tmp_path / "fqgan")]) == 0
    assert main(["sample", "--generator", str(tmp_path / "far"), "--out", str(tmp_path / "s"), "--classes", "0,1",
                 "--per-class", "4", "--guidance", "2.0", "--top-k", "0", "--top-p", "1.0", "--npz"]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (8, 64, 64, 3)
    report = eval_gen(tmp_path, tmp_path / "s" / "samples.npz", inception, str(tmp_path / "val"), "gen")
    assert report["num_samples"] == 8 and report["gfid"] > 0


def test_llamagen_gpt_gfid(random_inception, shards, tmp_path):  # noqa: F811
    """LlamaGen GPT-B gFID: import llamagen-vq, import llamagen-gpt --tokenizer, sample --npz, eval gen."""
    inception, _ = random_inception
    vq_state = {**official_state("llamagen-vq", seed=21), "quantize.codebook_used": torch.zeros(65536)}
    torch.save({"model": vq_state}, tmp_path / "vq_ds4_tiny.pt")
    assert main(["import", "llamagen-vq", str(tmp_path / "vq_ds4_tiny.pt"), "--out", str(tmp_path / "vq")]) == 0
    gpt = build_model("gpt-tiny", vocab_sizes=(256,))
    official = {k: 0.2 * torch.randn_like(v) for k, v in
                get_importer("llamagen-gpt").to_official(gpt.state_dict(), gpt).items()}
    torch.save({"model": official, "steps": 1}, tmp_path / "c2i_tiny_128.pt")
    assert main(["import", "llamagen-gpt", str(tmp_path / "c2i_tiny_128.pt"), "--out", str(tmp_path / "gpt"),
                 "--tokenizer", str(tmp_path / "vq")]) == 0
    assert main(["sample", "--generator", str(tmp_path / "gpt"), "--out", str(tmp_path / "s"), "--classes", "2,5",
                 "--per-class", "4", "--guidance", "2.0", "--npz"]) == 0
    report = eval_gen(tmp_path, tmp_path / "s" / "samples.npz", inception, shards["wds"], "gen")
    assert report["num_samples"] == 8 and report["gfid"] > 0


def test_dit_xl_gfid(random_inception, shards, tmp_path):  # noqa: F811
    """DiT-XL/2 gFID: import dit --vae, sample with DDPM steps and cfg 1.5 --npz, eval gen."""
    from diffusers import AutoencoderKL

    inception, _ = random_inception
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    torch.save(official_state("dit", seed=22), tmp_path / "DiT-tiny-2-64x64.pt")  # released files: raw EMA dicts
    assert main(["import", "dit", str(tmp_path / "DiT-tiny-2-64x64.pt"), "--out", str(tmp_path / "dit"), "--vae",
                 str(tmp_path / "vae")]) == 0
    assert main(["sample", "--generator", str(tmp_path / "dit"), "--out", str(tmp_path / "s"), "--classes", "0,9",
                 "--per-class", "4", "--steps", "5", "--guidance", "1.5", "--npz"]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (8, 16, 16, 3)  # 8x8 latents through the tiny VAE's 2x decoder
    report = eval_gen(tmp_path, tmp_path / "s" / "samples.npz", inception, shards["wds"], "gen")
    assert report["num_samples"] == 8 and report["gfid"] > 0
