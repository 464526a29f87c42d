"""`vtok sample --caption`: captions -> the T5 of `vtok precompute text-emb` -> a text-conditional
generator. A tiny random T5 saved to disk encodes the synthetic shapes' captions into shards; a text
DiT-T2I (pixels) and a text GPT (on per-class ids of a tiny FlexTok, decoded from a K-token prefix)
train 60 steps on them and are exported; `vtok sample` then draws one grid row per caption through the CLI,
with the T5 the exports record. Also: the same T5 code path as the shards, captions steer samples at a
fixed seed, and the one-line errors (exit 2)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from vtok.cli import main
from vtok.config import load_recipe
from vtok.data.shards import ShardSource
from vtok.data.synthetic import write_synthetic
from vtok.data.writers import write_shards
from vtok.eval.sample import SampleOptions, sample_images, text_condition, token_decoder
from vtok.models.export import load_export, save_export
from vtok.models.registry import build_model
from vtok.precompute.text_emb import save_random_t5
from vtok.train import Trainer

RES, R, L, WIDTH = 16, 8, 8, 16  # image side, FlexTok tokens, caption tokens, T5 width
WORDS = ("a an the red green blue yellow orange purple circle square triangle star cross ring on small big "
         "white grey black pale background").split()
CAPTIONS = ("a red circle on a white background", "a blue square on a grey background")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def save_t5(path, width: int = WIDTH) -> None:
    """A tiny random T5 encoder (1 block) + an offline word-level tokenizer over WORDS."""
    save_random_t5(path, width, heads=4, d_ff=32, num_layers=1, words=WORDS)


def class_tokens(cls: int, vocab: int) -> np.ndarray:
    """A per-class FlexTok id sequence (1, R): what the caption must tell the GPT."""
    return ((cls * 37 + np.arange(R) * 11) % vocab).astype(np.int16)[None]


def write_class_codes(text_shards, out, tok_dir) -> None:
    """Code shards beside the T5 shards' text_emb / text_mask whose ids follow the class (the random
    tiny FlexTok's own codes hardly depend on the image), with the FlexTok's codes.json."""
    spec = load_export(tok_dir, "tokenizer").token_spec
    source = ShardSource.open(str(text_shards))

    def produce(i):
        for x in source.read(i):
            cls = int(x["cls"])
            yield {"__key__": x["__key__"], "cls": cls, "codes": class_tokens(cls, spec.vocab_sizes[0]),
                   "text_emb": np.asarray(x["text_emb"]), "text_mask": np.asarray(x["text_mask"])}

    write_shards(out, "wds", len(source), produce, progress=False)
    (out / "codes.json").write_text(json.dumps({"token_spec": spec.to_dict(), "resolution": RES,
                                                "tokenizer": str(tok_dir)}))


def train_export(smoke: str, shards, run_dir, out, steps: int, *extra) -> None:
    """``steps`` steps of a smoke recipe on ``shards``, exported to ``out``."""
    rec = load_recipe(ROOT / "recipes" / "smoke" / smoke, [
        f"data.train_shards={shards}", "data.num_workers=0", f"run_dir={run_dir}", "log.progress=false",
        "log.tensorboard=false", "train.log_every=1", "train.eval_every=0", "data.batch_size=16",
        f"train.steps={steps}", "train.optim.main.warmup_steps=1", "model.condition=text", *extra])
    trainer = Trainer(rec)
    trainer.fit()
    trainer.export(out)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """{'t5', 'text' (image shards + T5 text_emb), 'dit', 'gpt', 'tok'}: the T5, the shards and the exports."""
    root = tmp_path_factory.mktemp("sample_text")
    save_t5(root / "t5")
    write_synthetic(root / "img", "wds", 48, 24, resolution=RES, progress=False)
    assert main(["precompute", "text-emb", "--encoder", str(root / "t5"), "--data", str(root / "img"),
                 "--out", str(root / "text"), "--max-length", str(L), "--no-progress"]) == 0
    # 60 steps (~2 s): the DiT's cross-attention starts at zero (adaLN-Zero style), so captions need
    # some training to show in the samples
    train_export("dit_shapes.yaml", root / "text", root / "dit_run", root / "dit", 60, "train.optim.main.lr=5e-3",
                 "data.fields=[image,text_emb,text_mask]", "model.depth=1", "model.hidden=32", "model.heads=2",
                 "model.patch_size=4")

    torch.manual_seed(0)  # a tiny FlexTok, exported as the flextok task exports an identity-VAE run
    tok = build_model("flextok-tiny", latent_channels=3, latent_size=RES, vae_downsample=1, patch_size=4,
                      num_registers=R).eval()
    torch.nn.init.normal_(tok.encoder.head.weight, std=0.5)  # zero-initialised: make the ids vary
    save_export(root / "tok", tok, "flextok-tiny", meta={"source": "image", "vae": "identity", "latent_scaling": 1.0,
                                                         "latent_shift": 0.0, "latent_shape": [3, RES, RES]})
    write_class_codes(root / "text", root / "codes", root / "tok")
    # 60 steps at a constant 5e-3 (~3 s): the caption shows in the samples (after 20: not yet, the
    # ids' marginal dominates the logits)
    train_export("gpt_flextok_shapes.yaml", root / "codes", root / "gpt_run", root / "gpt", 60,
                 "data.fields=[codes,text_emb,text_mask]", f"model.text_meta={root / 'text' / 'text-emb.json'}",
                 "train.optim.main.lr=5e-3", "train.optim.main.schedule=constant")
    return {k: root / k for k in ("t5", "text", "dit", "gpt", "tok")}


def sample(gen, out, *args) -> int:
    return main(["sample", "--generator", str(gen), "--out", str(out), "--batch-size", "8", *map(str, args)])


def test_exports_record_the_t5_and_captions_encode_as_in_the_shards(text_setup):
    from vtok.precompute.text_emb import load_text_encoder

    for name in ("dit", "gpt"):
        info = load_export(text_setup[name], "generator").meta["text_encoder"]
        assert info == {"encoder": str(text_setup["t5"].resolve()), "tokenizer": "", "max_length": L}, info
    source = ShardSource.open(str(text_setup["text"]))
    first = next(iter(source.read(0)))
    emb, mask = load_text_encoder(str(text_setup["t5"]), L, "cpu").stored([first["caption"]])
    assert emb.dtype == torch.float16 and emb.shape == (1, L, WIDTH) and mask.shape == (1, L)
    assert np.array_equal(emb[0].numpy(), np.asarray(first["text_emb"]))
    assert np.array_equal(mask[0].numpy(), np.asarray(first["text_mask"]).astype(bool))


def test_text_gpt_samples_one_row_per_caption_from_a_k_token_prefix(text_setup, tmp_path, capsys):
    out = tmp_path / "gpt"
    assert sample(text_setup["gpt"], out, "--caption", CAPTIONS[0], "--caption", CAPTIONS[1], "--per-caption", 3,
                  "--num-tokens", 4, "--decode-steps", 2, "--npz") == 0
    assert "for 2 caption(s)" in capsys.readouterr().out
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (6, RES, RES, 3) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [0, 0, 0, 1, 1, 1] and f["captions"].tolist() == [CAPTIONS[0]] * 3 + [
            CAPTIONS[1]] * 3
        assert int(f["num_tokens"]) == 4
    pad = 2  # save_grid's padding: 2 rows (captions) x 3 columns
    assert Image.open(out / "samples.png").size == (3 * (RES + pad) + pad, 2 * (RES + pad) + pad)


def test_captions_steer_the_text_gpt_at_a_fixed_seed(text_setup):
    """The codes ``vtok sample --caption`` decodes (the tiny FlexTok's untrained decoder hardly
    depends on them): the same caption and seed draw the same codes, another caption other codes."""
    gen, tok = load_export(text_setup["gpt"], "generator"), load_export(text_setup["tok"], "tokenizer")
    source = ShardSource.open(str(text_setup["text"]))
    by_class = {int(x["cls"]): x["caption"] for i in range(len(source)) for x in source.read(i)}
    a, b = (by_class[c] for c in sorted(by_class)[:2])
    opts = SampleOptions(seed=3, decode_steps=2, batch_size=8)
    decode = token_decoder(tok, "cpu", opts)
    codes = {}
    for name, caption in (("a", a), ("a2", a), ("b", b)):
        cond = text_condition(gen, "gpt", [caption], 8, "", torch.device("cpu"))
        codes[name] = sample_images(gen.model, tok.model, cond, opts, progress=False, decode=decode)[1]
    assert codes["a"].shape == (8, 1, R) and torch.equal(codes["a"], codes["a2"])
    # Measured (guidance 2, temperature 1): 41% of the ids differ (0% after 20 training steps)
    differ = (codes["a"] != codes["b"]).float().mean()
    assert differ > 0.2, f"{differ:.0%} of the ids differ"


def test_text_dit_samples_captions_from_a_file_and_captions_steer_samples(text_setup, tmp_path):
    file = tmp_path / "captions.txt"
    file.write_text(f"{CAPTIONS[0]}\n\n{CAPTIONS[1]}\n")
    runs = {"file": ("--captions", file), "a": ("--caption", CAPTIONS[0]), "a2": ("--caption", CAPTIONS[0]),
            "b": ("--caption", CAPTIONS[1])}
    arrays = {}
    for name, args in runs.items():
        assert sample(text_setup["dit"], tmp_path / name, *args, "--per-caption", 2, "--steps", 3,
                      "--guidance", 4, "--seed", 5, "--npz") == 0
        with np.load(tmp_path / name / "samples.npz") as f:
            arrays[name] = f["arr_0"].astype(np.int16)
    assert arrays["file"].shape == (4, RES, RES, 3)
    assert Image.open(tmp_path / "file" / "samples.png").size == (2 * (RES + 2) + 2, 2 * (RES + 2) + 2)
    assert np.array_equal(arrays["a"], arrays["a2"])  # a fixed seed and caption: the same samples
    # Measured (60 training steps, guidance 4): the two captions' samples differ by 3.8 uint8 levels on
    # average (0.006 after 4 steps at a 30-step warmup: the cross-attention starts at zero)
    diff = np.abs(arrays["a"] - arrays["b"]).mean()
    assert diff > 1.0, diff


def test_text_errors_are_one_line(text_setup, tmp_path, capsys):
    def error(gen, *args) -> str:
        assert sample(gen, tmp_path / "bad", *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    torch.manual_seed(0)
    cls_dit = build_model("dit-tiny", token_mode="2d", in_channels=3, input_size=RES, patch_size=4, depth=1,
                          hidden=32, heads=2, num_classes=4)
    save_export(tmp_path / "cls", cls_dit, "dit-tiny", meta={"source": "image", "diffusion": {"objective": "flow"}})
    assert "--caption: " in error(tmp_path / "cls", "--caption", CAPTIONS[0])
    assert "is a text-conditional GPT: pass --caption TEXT or --captions FILE" in error(text_setup["gpt"])
    assert "instead of --classes" in error(text_setup["dit"], "--classes", "0,1")
    missing = tmp_path / "no_t5"
    assert f"--t5 {missing}: no T5 encoder there" in error(text_setup["dit"], "--caption", "a", "--t5", missing)
    save_t5(tmp_path / "t5_wide", width=24)
    assert "d_model=24 != the generator's text width 16" in error(
        text_setup["gpt"], "--caption", "a", "--t5", tmp_path / "t5_wide")
    assert "--captions nope.txt: no such file" in error(text_setup["dit"], "--captions", "nope.txt")
    old = tmp_path / "old_dit"  # an export from before the T5 was recorded
    shutil.copytree(text_setup["dit"], old)
    config = json.loads((old / "config.json").read_text())
    del config["text_encoder"]
    (old / "config.json").write_text(json.dumps(config))
    assert "records no T5 encoder (exported by an older vtok): pass --t5 DIR" in error(old, "--caption", "a")
    config["text_encoder"] = {"encoder": str(missing), "tokenizer": "", "max_length": L}  # the T5 moved away
    (old / "config.json").write_text(json.dumps(config))
    assert f"the T5 the export names ({missing}): no T5 encoder there" in error(old, "--caption", "a")
    assert sample(old, tmp_path / "old", "--caption", "a", "--t5", text_setup["t5"], "--per-caption", 1,
                  "--steps", 2) == 0
