"""The precompute jobs on tiny random models saved to disk and loaded through the user's path:
T5 text embeddings, diffusers VAE latents (read back through the training loader), BLIP captions."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_recipe
from vtok.cli import main
from vtok.data.loader import build_loader
from vtok.data.shards import ShardSource
from vtok.data.transforms import decode_image, normalize_batch
from vtok.data.writers import write_shard
from vtok.models.api import TokenSpec
from vtok.precompute.captions import clean_caption
from vtok.precompute.codes import code_dtype

WORDS = ("a an the red green blue yellow circle square triangle star shape photo of on with small big white "
         "background").split()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """{'t5', 'vae', 'blip'}: tiny random models + offline-built tokenizers / processors, saved."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, PreTrainedTokenizerFast, T5Config, T5EncoderModel)

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "t5")
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4)).save_pretrained(root / "t5")

    AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")

    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                              BertTokenizer(str(root / "vocab.txt")))
    text = dict(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # random weights may end at once; never emitting [SEP] makes 12 tokens of words
        blip.text_decoder.cls.predictions.decoder.bias[3] = -100.0
    blip.save_pretrained(root / "blip")
    processor.save_pretrained(root / "blip")
    return {name: root / name for name in ("t5", "vae", "blip")}


def samples_of(path) -> dict[str, dict]:
    source = ShardSource.open(str(path))
    return {s["__key__"]: s for i in range(len(source)) for s in source.read(i)}


def vtok(*args) -> int:
    return main(["precompute", *map(str, args), "--no-progress"])


def test_text_emb_equals_a_direct_t5_encoder_call(shards, models, tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    out = tmp_path / "te"
    assert vtok("text-emb", "--encoder", models["t5"], "--data", shards["wds"], "--out", out, "--format", "mds",
                "--batch-size", 64) == 0
    got = samples_of(out)
    assert len(got) == 240 and (out / "index.json").is_file()
    tok, t5 = AutoTokenizer.from_pretrained(models["t5"]), T5EncoderModel.from_pretrained(models["t5"]).eval()
    for key in ("00000000", "00000117", "00000239"):
        s = got[key]
        assert s["text_emb"].shape == (128, 32) and s["text_emb"].dtype == np.float16
        assert s["text_mask"].dtype == bool and {"image", "cls", "caption"} <= set(s)
        enc = tok([s["caption"]], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        with torch.no_grad():
            want = t5(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
        np.testing.assert_allclose(s["text_emb"].astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)
        assert (s["text_mask"] == enc["attention_mask"][0].bool().numpy()).all()
    meta = json.loads((out / "text-emb.json").read_text())
    assert meta["shape"] == [128, 32] and meta["max_length"] == 128


def test_empty_caption_is_bad_by_default_or_the_null_embedding(models, tmp_path, capsys):
    from transformers import AutoTokenizer, T5EncoderModel

    data = tmp_path / "captions"
    data.mkdir()
    write_shard(data, "wds", 0, [{"__key__": k, "caption": c} for k, c in
                                 (("a", "a red circle"), ("b", " "), ("c", "a big blue square"))])
    assert vtok("text-emb", "--encoder", models["t5"], "--data", data, "--out", tmp_path / "strict") == 2
    assert "1 of 3 samples were bad" in capsys.readouterr().err
    bad = json.loads((tmp_path / "strict" / "precompute.json").read_text())["bad_samples"]
    assert list(bad) == ["b"] and "empty caption" in bad["b"]
    assert vtok("text-emb", "--encoder", models["t5"], "--data", data, "--out", tmp_path / "null",
                "--empty-caption", "null", "--max-length", 16) == 0
    got = samples_of(tmp_path / "null")
    tok, t5 = AutoTokenizer.from_pretrained(models["t5"]), T5EncoderModel.from_pretrained(models["t5"]).eval()
    enc = tok([""], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        null = t5(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state[0].numpy()
    assert got["b"]["caption"] == " " and got["b"]["text_mask"].sum() == 1  # just </s>
    np.testing.assert_allclose(got["b"]["text_emb"].astype(np.float32), null, atol=2e-3, rtol=2e-3)


def test_latents_equal_the_vae_encoding_of_the_loaders_images(shards, models, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "lat"
    assert vtok("latents", "--vae", models["vae"], "--data", shards["mds"], "--out", out, "--resolution", 16,
                "--flip", "--save-moments", "--batch-size", 32, "--format", "wds") == 0
    meta = json.loads((out / "latents.json").read_text())
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["shift_factor"] == 0.0
    assert meta["shape"] == [2, 4, 8, 8] and meta["downsample"] == 2
    got = samples_of(out)
    assert len(got) == 240 and got["00000000"]["latents"].dtype == np.float16

    loader = build_loader(data_recipe("mds", shards["mds"], "data.fields=[image]", "data.resolution=16").data,
                          train=False)
    batch = normalize_batch(next(iter(loader)))  # the loader's center crops at 16 px, in [-1, 1]
    vae = AutoencoderKL.from_pretrained(models["vae"]).eval()
    with torch.no_grad():
        post = vae.encode(torch.cat([batch["image"], batch["image"].flip(-1)])).latent_dist
    n = len(batch["__key__"])
    mean, std = post.mean * 0.18215, post.std * 0.18215
    for i, key in enumerate(batch["__key__"]):
        lat, lat_std = (torch.tensor(got[key][f], dtype=torch.float32) for f in ("latents", "latents_std"))
        torch.testing.assert_close(lat, torch.stack([mean[i], mean[n + i]]), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lat_std, torch.stack([std[i], std[n + i]]), atol=2e-3, rtol=2e-3)

    train = build_loader(data_recipe("wds", str(out), "data.fields=[latents,latents_std,cls]").data, train=False)
    b = next(iter(train))  # recipes can train on latents instead of images
    assert b["latents"].dtype == torch.float32 and b["latents"].shape == (8, 2, 4, 8, 8)
    assert b["latents_std"].shape == (8, 2, 4, 8, 8) and b["cls"].shape == (8,)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_latents_fields_round_trip_through_the_loader(tmp_path, fmt):
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i}", "latents": rng.standard_normal((4, 8, 8)).astype(np.float16),
                "latents_std": rng.random((4, 8, 8)).astype(np.float16)} for i in range(6)]
    write_shard(tmp_path, fmt, 0, samples)
    if fmt == "mds":
        from vtok.data.writers import finalize
        finalize(tmp_path, fmt)
    cfg = data_recipe(fmt, str(tmp_path), "data.fields=[latents,latents_std]", "data.shuffle=false").data
    (batch,) = list(build_loader(cfg, train=False))
    assert batch["latents"].shape == (6, 4, 8, 8) and batch["latents"].dtype == torch.float32
    for key, lat, std in zip(batch["__key__"], batch["latents"], batch["latents_std"]):
        want = samples[int(key[1:])]
        assert torch.equal(lat, torch.from_numpy(want["latents"].astype(np.float32)))
        assert torch.equal(std, torch.from_numpy(want["latents_std"].astype(np.float32)))


def test_blip_captions_equal_direct_generation_truncated_to_max_words(shards, models, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    data = f"{shards['wds']}/shard-{{000000..000001}}.tar"
    out = tmp_path / "cap"
    assert vtok("captions", "--model", models["blip"], "--data", data, "--out", out, "--prompt", "a photo of",
                "--max-words", 4, "--max-new-tokens", 12, "--batch-size", 8) == 0
    got, inputs = samples_of(out), samples_of(data)
    assert sorted(got) == sorted(inputs) and len(got) == 40
    assert all(0 < len(s["caption"].split()) <= 4 for s in got.values())
    processor = BlipProcessor.from_pretrained(models["blip"])
    model = BlipForConditionalGeneration.from_pretrained(models["blip"]).eval()
    keys = ["00000000", "00000021", "00000039"]
    images = [decode_image(inputs[k]["image"]) for k in keys]
    enc = processor(images=images, text=["a photo of"] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
    for key, text in zip(keys, processor.batch_decode(ids, skip_special_tokens=True)):
        assert got[key]["caption"] == clean_caption(text, "a photo of", 4)
        assert got[key]["image"] == inputs[key]["image"]  # input fields kept
    meta = json.loads((out / "captions.json").read_text())
    assert meta["class"] == "BlipForConditionalGeneration" and meta["max_words"] == 4


def test_caption_cleaning_and_code_dtypes():
    assert clean_caption("A photo of  a red\ncircle on white", "a photo of", 3) == "a red circle"
    assert clean_caption(" ".join(["w"] * 100), "", 75) == " ".join(["w"] * 75)
    assert clean_caption("x y", "", 0) == "x y"
    assert code_dtype(TokenSpec((2, 8, 8), 32, vocab_sizes=(256, 256))) == np.int16
    assert code_dtype(TokenSpec((1, 8, 8), 32, vocab_sizes=(64000,))) == np.int32
    assert code_dtype(TokenSpec((32, 8), 256, dim=8)) == np.float16  # continuous tokens (TexTok)
