"""Generation on TexTok tokens: `vtok data class-captions` (held-out captions per class + their T5
embeddings), a class-conditional DiT whose eval grids and `vtok sample` decode each sample with a
caption of its class, DiT-T2I on the codes (text-emb.json found through the codes' source) whose
`vtok sample --caption` decodes with that caption, and the one-line errors naming the fix."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from vtok.cli import main as vtok_main
from vtok.config import RecipeError, load_recipe
from vtok.data.class_captions import ClassCaptions
from vtok.data.shards import ShardSource
from vtok.data.transforms import DataError
from vtok.models.api import Condition
from vtok.models.export import load_export
from vtok.tasks.dit import make_decoder
from vtok.tasks.textok import save_random_t5
from vtok.train import Trainer

TEXTOK = ROOT / "recipes" / "smoke" / "textok_shapes.yaml"
DIT = ROOT / "recipes" / "smoke" / "dit_shapes.yaml"
COMMON = ["data.num_workers=0", "log.progress=false", "log.tensorboard=false", "ckpt.every_steps=1000"]


def samples_of(path) -> list[dict]:
    source = ShardSource.open(str(path))
    return [s for i in range(len(source)) for s in source.read(i)]


@pytest.fixture(scope="module")
def textok(shards, tmp_path_factory) -> dict:
    """32 px shapes + T5 embeddings (tiny random T5), a TexTok (N = 4 x 8) trained 2 steps and
    exported, its codes (`vtok precompute codes`) and the class captions (3 per class)."""
    root = tmp_path_factory.mktemp("textok_gen")
    t5 = save_random_t5(root / "t5")
    text = root / "t5_shards"
    assert vtok_main(["precompute", "text-emb", "--encoder", str(t5), "--data", shards["wds"], "--out",
                      str(text), "--max-length", "16", "--no-progress"]) == 0
    rec = load_recipe(TEXTOK, [f"data.train_shards={text}", "data.batch_size=8", f"run_dir={root / 'tok'}",
                               "train.steps=2", "train.eval_every=0", *COMMON])
    trainer = Trainer(rec)
    trainer.fit()
    trainer.export(root / "tok_export")
    assert vtok_main(["precompute", "codes", "--tokenizer", str(root / "tok_export"), "--data", str(text),
                      "--out", str(root / "codes"), "--resolution", "32", "--no-progress"]) == 0
    assert not (root / "codes" / "text-emb.json").exists()  # found through precompute.json's input
    assert vtok_main(["data", "class-captions", "--data", str(text), "--out", str(root / "cc.json"),
                      "--per-class", "3"]) == 0
    return {"text": str(text), "export": root / "tok_export", "codes": str(root / "codes"),
            "captions": str(root / "cc.json"), "root": root}


def dit_recipe(data, run_dir, *extra):
    return load_recipe(DIT, [f"data.train_shards={data}", f"run_dir={run_dir}", "data.batch_size=8",
                             "model.depth=1", "model.hidden=32", "model.heads=2", "train.log_every=1",
                             "model.eval_classes=3", "model.eval_per_class=2", "model.eval_steps=2", *COMMON,
                             *extra])


def test_class_captions_keep_the_last_n_per_class_with_float16_embeddings(textok, shards, tmp_path):
    info = json.loads(open(textok["captions"]).read())
    seen: dict[int, list[str]] = {}
    for s in samples_of(textok["text"]):
        seen.setdefault(int(s["cls"]), []).append(s["caption"])
    assert info["per_class"] == 3 and info["embeddings"] == "cc.npz" and info["text_shape"] == [16, 32]
    assert info["text_encoder"]["max_length"] == 16
    assert {int(c): v for c, v in info["captions"].items()} == {c: v[-3:] for c, v in seen.items()}
    with np.load(textok["root"] / "cc.npz") as z:
        c = min(seen)
        assert z[f"emb_{c}"].dtype == np.float16 and z[f"emb_{c}"].shape == (len(seen[c][-3:]), 16, 32)
        assert z[f"mask_{c}"].dtype == bool and z[f"mask_{c}"].shape == (len(seen[c][-3:]), 16)

    captions = ClassCaptions.load(textok["captions"])
    labels = torch.tensor([0, 0, 1, 5, 5, 5])
    cond, words = captions.condition(labels, torch.Generator().manual_seed(0))
    assert cond.text.shape == (6, 16, 32) and cond.text.dtype == torch.float32 and cond.text_mask.shape == (6, 16)
    assert all(w in captions.captions[int(c)] for w, c in zip(words, labels))
    again = captions.condition(labels, torch.Generator().manual_seed(0))
    assert again[1] == words and torch.equal(again[0].text, cond.text)  # seeded
    with pytest.raises(DataError, match=r"no captions for classes \[999\]"):
        captions.condition(torch.tensor([999]))

    # image shards without T5 embeddings: captions only, and loading for decoding names the fix
    assert vtok_main(["data", "class-captions", "--data", shards["wds"], "--out", str(tmp_path / "plain.json"),
                      "--per-class", "2"]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["embeddings"] is None
    with pytest.raises(DataError, match="has no embeddings .*`vtok precompute text-emb`"):
        ClassCaptions.load(tmp_path / "plain.json")
    with pytest.raises(DataError, match="no such file; write it with `vtok data class-captions"):
        ClassCaptions.load(tmp_path / "missing.json")


def test_class_dit_on_textok_codes_decodes_with_class_captions(textok, tmp_path, capsys):
    rec = dit_recipe(textok["codes"], tmp_path / "run", "data.fields=[codes,cls]", "train.steps=2",
                     "train.eval_every=2", f"model.class_captions={textok['captions']}")
    trainer = Trainer(rec)
    trainer.fit()
    assert (tmp_path / "run" / "samples" / "step_000000002.png").is_file()  # decoded with class captions
    trainer.export(tmp_path / "gen")
    meta = load_export(tmp_path / "gen", "generator").meta
    assert meta["class_captions"].endswith("cc.json") and meta["tokenizer"].endswith("tok_export")

    # the decoder reads the caption: the same tokens under two captions decode differently
    decode = make_decoder(meta)
    assert decode.needs_text and decode.text_dim == 32
    cond, _ = ClassCaptions.load(textok["captions"]).condition(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    z = torch.randn(1, 4, 8).expand(2, 4, 8)
    images = decode(z, cond)
    assert images.shape == (2, 3, 32, 32) and (images[0] - images[1]).abs().max() > 1e-4
    with pytest.raises(RecipeError, match="decodes with captions"):
        decode(z)

    out = tmp_path / "samples"
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(out), "--classes", "0,1",
                      "--per-class", "2", "--steps", "2", "--npz"]) == 0  # the export's class captions
    assert (out / "samples.png").is_file()
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and list(z["labels"]) == [0, 0, 1, 1]
        lists = ClassCaptions.load(textok["captions"]).captions
        assert all(w in lists[int(c)] for w, c in zip(z["decode_captions"], z["labels"]))
    capsys.readouterr()
    # errors: --class-captions on a file that is not there; a T2I-only flag misuse
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(out), "--classes", "0",
                      "--steps", "1", "--class-captions", str(tmp_path / "nope.json")]) == 2
    assert "no such file; write it with `vtok data class-captions" in capsys.readouterr().err


def test_class_dit_without_class_captions_names_the_fix(textok, tmp_path, capsys):
    with pytest.raises(RecipeError, match=r"needs a caption per sample: set model.class_captions=FILE.json .*"
                                          "`vtok data class-captions --data IMAGE_SHARDS --out FILE.json`"):
        Trainer(dit_recipe(textok["codes"], tmp_path / "a", "data.fields=[codes,cls]", "train.eval_every=5"))
    trainer = Trainer(dit_recipe(textok["codes"], tmp_path / "run", "data.fields=[codes,cls]", "train.steps=1",
                                 "train.eval_every=0"))
    trainer.fit()
    trainer.export(tmp_path / "gen")
    capsys.readouterr()
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "s"),
                      "--classes", "0", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --class-captions FILE.json" in err, err
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "s"), "--classes",
                      "0", "--steps", "1", "--class-captions", textok["captions"]]) == 0


def test_t2i_dit_on_textok_codes_decodes_with_its_caption(textok, tmp_path, capsys):
    rec = dit_recipe(textok["codes"], tmp_path / "run", "data.fields=[codes,text_emb,text_mask]",
                     "model.condition=text", "train.steps=2", "train.eval_every=2")
    trainer = Trainer(rec)  # no model.text_meta: the codes' precompute.json leads to the image shards'
    assert trainer.task.unwrapped("dit").cfg.text_dim == 32
    trainer.fit()
    assert (tmp_path / "run" / "samples" / "step_000000002.png").is_file()  # decoded with the grid captions
    trainer.export(tmp_path / "gen")
    meta = load_export(tmp_path / "gen", "generator").meta
    assert meta["text_encoder"]["max_length"] == 16 and "class_captions" not in meta
    out = tmp_path / "samples"
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(out), "--caption",
                      "a small red circle", "--caption", "a large blue square", "--per-caption", "2",
                      "--steps", "2", "--npz"]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and list(z["captions"][:2]) == ["a small red circle"] * 2
    capsys.readouterr()
    assert vtok_main(["sample", "--generator", str(tmp_path / "gen"), "--out", str(out), "--caption", "x",
                      "--steps", "1", "--class-captions", textok["captions"]]) == 2
    assert "--class-captions: " in capsys.readouterr().err
    # the decoder condition is the DiT's: changing the caption changes the decoded image of fixed tokens
    decode = make_decoder(meta)
    text = torch.randn(2, 16, 32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    z = torch.randn(1, 4, 8).expand(2, 4, 8)
    images = decode(z, Condition(text=text, text_mask=mask))
    assert (images[0] - images[1]).abs().max() > 1e-4
