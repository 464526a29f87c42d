"""``vtok eval recon`` on an ordered tokenizer: a tiny FlexTok export (identity VAE, as the flextok
task exports it) evaluated at every token count, with a plot, a coarse-to-fine grid, seeded decoding
and the CLI flags."""
import json

import pytest
import torch
from PIL import Image

from vtok.cli import main
from vtok.data.synthetic import write_synthetic
from vtok.eval import EvalError
from vtok.eval.by_length import DecodeOptions, check_lengths, parse_lengths, plot_by_length
from vtok.eval.recon import evaluate_recon
from vtok.models.export import save_export
from vtok.models.registry import build_model
from vtok.tasks.flextok import IDENTITY

R = 8  # registers of the tiny export


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(export dir, shards dir): a flextok-tiny on 16 px pixels (4x4 patches, 8 registers), weights
    nudged so that every token matters, and 6 synthetic shapes."""
    root = tmp_path_factory.mktemp("flextok_eval")
    torch.manual_seed(0)
    model = build_model("flextok-tiny", latent_channels=3, latent_size=16, vae_downsample=1, patch_size=4,
                        num_registers=R)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"source": "image", "vae": IDENTITY, "latent_scaling": 1.0, "latent_shift": 0.0,
            "latent_shape": [3, 16, 16]}
    save_export(root / "export", model, "flextok-tiny", meta=meta)
    write_synthetic(root / "wds", num_samples=6, samples_per_shard=3, resolution=16, progress=False)
    return root / "export", root / "wds"


def test_by_length_table_files_and_identical_rerun(setup, tmp_path):
    export, data = setup
    kw = dict(resolution=16, batch_size=4, steps=2, guidance=2.0, apg=True, seed=7, grid_images=3)
    report = evaluate_recon(str(export), str(data), str(tmp_path / "a"), **kw)
    assert [row["k"] for row in report["by_length"]] == [1, 2, 4, 8]
    assert report["num_images"] == 6 and report["num_tokens"] == 8
    assert report["decode"] == {"steps": 2, "guidance": 2.0, "apg": True, "seed": 7}
    for row in report["by_length"]:
        assert row["psnr"] > 0 and -1 <= row["ssim"] <= 1 and row["lpips"] is None and row["rfid"] is None
    assert report["psnr"] == report["by_length"][-1]["psnr"]
    assert len({row["psnr"] for row in report["by_length"]}) == 4  # the token count changes the decode
    on_disk = json.loads((tmp_path / "a" / "recon.json").read_text())
    assert on_disk["by_length"] == report["by_length"]
    grid = Image.open(tmp_path / "a" / "coarse_to_fine.png")
    assert grid.size == (5 * 18 + 2, 3 * 18 + 2)  # columns: original + 4 lengths; rows: 3 images (16 px, pad 2)
    plot = Image.open(tmp_path / "a" / "by_length.png")
    assert plot.size[0] == 2 * plot.size[1] * 320 // 220  # two panels: PSNR and SSIM
    # seeded per image: a rerun gives the same numbers
    again = evaluate_recon(str(export), str(data), str(tmp_path / "b"), **kw)
    assert again["by_length"] == report["by_length"]
    other = evaluate_recon(str(export), str(data), str(tmp_path / "c"), **{**kw, "seed": 8, "lengths": [2, 8]})
    assert [row["k"] for row in other["by_length"]] == [2, 8]
    assert other["by_length"][1]["psnr"] != report["by_length"][-1]["psnr"]


def test_cli_flags_and_one_line_errors(setup, tmp_path, capsys):
    export, data = setup
    out = tmp_path / "cli"
    argv = ["eval", "recon", "--tokenizer", str(export), "--data", str(data), "--out", str(out),
            "--resolution", "16", "--max-samples", "2", "--steps", "2", "--guidance", "1", "--no-apg",
            "--lengths", "1,8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "at 8 tokens" in printed and "k=1" in printed and "coarse_to_fine.png" in printed
    report = json.loads((out / "recon.json").read_text())
    assert [row["k"] for row in report["by_length"]] == [1, 8] and report["num_images"] == 2
    assert report["decode"] == {"steps": 2, "guidance": 1.0, "apg": False, "seed": 0}
    assert main(argv[:-1] + ["1,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lengths" in err and "1..8" in err
    assert main(argv[:-1] + ["one"]) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_options_lengths_and_plot_helpers(tmp_path):
    assert DecodeOptions.resolve() == DecodeOptions(steps=20, guidance=7.5, apg=True, seed=0)
    assert DecodeOptions.resolve(guidance=1.0, apg=False).guidance_spec() is None
    with pytest.raises(EvalError, match="--steps"):
        DecodeOptions.resolve(steps=0)
    assert check_lengths(None, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256] and check_lengths([4, 2, 4], 8) == [2, 4]
    assert parse_lengths("") is None and parse_lengths("1, 4,16") == [1, 4, 16]
    table = [{"k": k, "psnr": 10.0 + k, "ssim": 0.5, "lpips": 0.1, "rfid": None} for k in (1, 4, 16)]
    path = plot_by_length(table, tmp_path / "p.png")
    image = Image.open(path)
    assert image.size == (3 * 320, 220)  # PSNR, SSIM, LPIPS; no rFID column without values
    assert len(image.getcolors(1 << 16)) > 2  # something was drawn


def test_latents_of_a_diffusers_vae_are_decoded_to_pixels(tmp_path, capsys):
    """An export on a VAE's latents: images go through its encoder, decodes through its decoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    model = build_model("flextok-tiny", latent_size=8, vae_downsample=2, num_registers=R)  # 4 x 8 x 8 latents
    meta = {"source": "image", "vae": str(tmp_path / "vae"), "latent_scaling": 1.0, "latent_shift": 0.0}
    save_export(tmp_path / "export", model, "flextok-tiny", meta=meta)
    write_synthetic(tmp_path / "wds", num_samples=4, samples_per_shard=2, resolution=16, progress=False)
    report = evaluate_recon(str(tmp_path / "export"), str(tmp_path / "wds"), str(tmp_path / "out"), resolution=16,
                            steps=2, guidance=1.0, apg=False, lengths=[1, R])
    assert [row["k"] for row in report["by_length"]] == [1, R] and report["num_images"] == 4
    assert all(torch.isfinite(torch.tensor(row["psnr"])) for row in report["by_length"])
    save_export(tmp_path / "bare", model, "flextok-tiny", meta={**meta, "vae": ""})  # as `vtok import` without --vae
    argv = ["eval", "recon", "--tokenizer", str(tmp_path / "bare"), "--data", str(tmp_path / "wds"), "--out",
            str(tmp_path / "o2"), "--resolution", "16"]
    capsys.readouterr()  # diffusers' loading notes
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names no VAE" in err and "--vae" in err
