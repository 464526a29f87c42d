"""``vtok eval recon`` on TexTok exports: a text model reads text_emb / text_mask from the eval shards
and reports metrics with its captions and, as ``without_text``, with an empty caption (every text
position masked); the ``-notext`` twin reports only the usual block; ``--compare`` puts the twin
beside it; missing or mismatched text fields are one-line errors that name the fix."""
import json
import math

import pytest
import torch
from PIL import Image

from vtok.cli import main as vtok_main
from vtok.data.synthetic import write_synthetic
from vtok.eval import EvalError
from vtok.eval.recon import WITHOUT_TEXT, empty_caption, eval_batches, evaluate_recon
from vtok.eval.metrics import psnr
from vtok.models.api import Condition
from vtok.models.export import load_export, save_export
from vtok.models.registry import build_model
from vtok.tasks.textok import save_random_t5

SIZE = dict(image_size=16, patch_size=4, num_tokens=2)  # 16 px, 16 patches, 2 tokens of d = 8
KW = dict(resolution=16, batch_size=4, grid_images=3)


def nudged(arch: str, **kw) -> torch.nn.Module:
    """A tiny TexTok whose weights are pushed off their small init so that the text visibly matters."""
    torch.manual_seed(0)
    model = build_model(arch, **SIZE, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """6 synthetic 16 px shapes (plain, and with text_emb (8, 16) / text_mask from a tiny random T5);
    a text export (textok-tiny, text_dim 16) and its -notext twin."""
    root = tmp_path_factory.mktemp("textok_eval")
    write_synthetic(root / "wds", num_samples=6, samples_per_shard=3, resolution=16, progress=False)
    t5 = save_random_t5(root / "t5", width=16)
    assert vtok_main(["precompute", "text-emb", "--encoder", str(t5), "--data", str(root / "wds"), "--out",
                      str(root / "wds_t5"), "--max-length", "8", "--no-progress"]) == 0
    meta = {"text": True, "text_encoder": {"encoder": str(t5), "tokenizer": "", "max_length": 8}}
    save_export(root / "text", nudged("textok-tiny", text_dim=16, text_len=8), "textok-tiny", meta=meta)
    save_export(root / "notext", nudged("textok-tiny-notext"), "textok-tiny-notext", meta={"text": False})
    return {k: str(root / k) for k in ("wds", "wds_t5", "text", "notext", "t5")}


def finite_block(block: dict) -> bool:
    return all(math.isfinite(block[k]) for k in ("psnr", "ssim")) and block["lpips"] is None and block["rfid"] is None


def test_text_export_reports_with_and_without_text(setup, tmp_path):
    report = evaluate_recon(setup["text"], setup["wds_t5"], str(tmp_path / "a"), **KW)
    assert report["num_images"] == 6 and report["condition"].startswith("text")
    without = report["without_text"]
    assert without["meaning"] == WITHOUT_TEXT and "masked" in without["meaning"]
    assert finite_block(report) and finite_block(without) and "compare" not in report
    assert report["psnr"] != without["psnr"]  # the captions reach the model; the empty caption is different
    # by hand: with captions, and with an empty caption whose (masked) values are random instead of 0
    export = load_export(setup["text"], "tokenizer", torch.device("cpu"))
    model, with_text, masked = export.model, [], []
    for batch in eval_batches(setup["wds_t5"], ("image", "text_emb", "text_mask"), data_format="wds",
                              resolution=16, batch_size=4, max_images=0):
        x = batch["image"]
        cond = Condition(text=batch["text_emb"].float(), text_mask=batch["text_mask"])
        with_text.append(psnr(model.decode(model.encode(x, cond), cond), x))
        noise = Condition(text=torch.randn_like(cond.text), text_mask=empty_caption(cond).text_mask)
        masked.append(psnr(model.decode(model.encode(x, noise), noise), x))
    assert report["psnr"] == pytest.approx(float(torch.cat(with_text).mean()), abs=1e-4)
    assert without["psnr"] == pytest.approx(float(torch.cat(masked).mean()), abs=1e-4)
    on_disk = json.loads((tmp_path / "a" / "recon.json").read_text())
    assert on_disk["without_text"] == without
    grid = Image.open(tmp_path / "a" / "recon_grid.png")
    assert grid.size == (3 * 18 + 2, 3 * 18 + 2)  # 3 images; rows: original, with text, without text


def test_fully_masked_caption_is_finite_and_equals_no_text_tokens(setup):
    """Every text key masked: the image-side rows still have their image keys (no NaN), and the
    result is that of the same weights run with no text tokens in the sequence at all."""
    model = load_export(setup["text"], "tokenizer", torch.device("cpu")).model
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    empty = empty_caption(Condition(text=torch.randn(3, 8, 16), text_mask=torch.ones(3, 8, dtype=torch.bool)))
    assert not empty.text_mask.any() and not empty.text.any()
    tokens = model.encode(x, empty)
    rec = model.decode(tokens, empty)
    assert torch.isfinite(tokens).all() and torch.isfinite(rec).all()
    with torch.no_grad():
        assert torch.allclose(tokens, model.encoder(x, None, None), atol=1e-5)
        assert torch.allclose(rec, model.decoder(tokens, None, None), atol=1e-5)


def test_notext_export_has_only_the_usual_block(setup, tmp_path):
    report = evaluate_recon(setup["notext"], setup["wds"], str(tmp_path / "n"), **KW)  # plain shards suffice
    assert report["num_images"] == 6 and finite_block(report)
    assert not {"without_text", "condition", "compare"} & set(report)
    grid = Image.open(tmp_path / "n" / "recon_grid.png")
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # rows: original, reconstruction


def test_compare_puts_the_notext_twin_beside_it(setup, tmp_path, capsys):
    out = tmp_path / "c"
    assert vtok_main(["eval", "recon", "--tokenizer", setup["text"], "--data", setup["wds_t5"], "--out", str(out),
                      "--resolution", "16", "--batch-size", "4", "--compare", setup["notext"]]) == 0
    report = json.loads((out / "recon.json").read_text())
    twin = evaluate_recon(setup["notext"], setup["wds_t5"], str(tmp_path / "n"), **KW)
    compare = report["compare"]
    assert compare["arch"] == "textok-tiny-notext" and compare["text"] is False
    assert compare["psnr"] == pytest.approx(twin["psnr"], abs=1e-6) and compare["ssim"] == pytest.approx(twin["ssim"])
    assert "without_text" in report
    printed = capsys.readouterr().out
    assert "without_text  PSNR" in printed and "compare       PSNR" in printed


def test_missing_or_mismatched_text_fields_are_one_line_errors(setup, tmp_path, capsys):
    with pytest.raises(EvalError) as e:
        evaluate_recon(setup["text"], setup["wds"], str(tmp_path / "m"), **KW)
    msg = str(e.value)
    assert "\n" not in msg and "vtok precompute text-emb" in msg and f"--encoder {setup['t5']}" in msg
    assert vtok_main(["eval", "recon", "--tokenizer", setup["text"], "--data", setup["wds"], "--out",
                      str(tmp_path / "m"), "--resolution", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text_emb / text_mask" in err
    # a tokenizer trained on 24-wide embeddings, evaluated on 16-wide ones
    save_export(tmp_path / "wide", nudged("textok-tiny", text_dim=24, text_len=8), "textok-tiny")
    with pytest.raises(EvalError, match=r"16-wide text embeddings but textok-tiny .* reads 24-wide") as e:
        evaluate_recon(str(tmp_path / "wide"), setup["wds_t5"], str(tmp_path / "w"), **KW)
    assert "\n" not in str(e.value)
