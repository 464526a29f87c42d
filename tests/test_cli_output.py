"""What a person reads: --help on every flag (plain text, defaults shown), progress bar and log lines
that never run into each other, per-phase loss names, a status during saves and sample passes, the
closing summary of a command, errors for missing smoke data that name the command that writes it,
and files (checkpoints, exports) that respect the umask."""
import argparse
import io
import logging
import os
import stat
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

import tiny_tasks  # noqa: F401  (registers the test tasks)
from conftest import ROOT, write_train_recipe
from vtok.cli import build_parser, main, walk_parsers
from vtok.config import RecipeError, load_recipe
from vtok.console import TqdmLoggingHandler, summary
from vtok.data.transforms import DataError
from vtok.train import Trainer
from vtok.train.metrics import bar_postfix


# ---- --help --------------------------------------------------------------------------------------
def test_every_option_of_every_command_has_help_and_no_rst():
    parsers = list(walk_parsers(build_parser()))
    assert len(parsers) > 10  # vtok, demo, info, train, export, precompute + jobs, sample, eval x2, data x2
    for path, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"`{path}`: {name} has no help"
            assert "``" not in action.help, f"`{path}`: {name} help has RST backticks"
        for text in (parser.description, parser.epilog, parser.format_help()):
            assert "``" not in (text or ""), f"`{path}` --help shows RST backticks"


def test_help_shows_defaults():
    """Every optional option that takes a value says its default (or that it has none)."""
    for path, parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not action.required and not isinstance(
                    action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
                text = parser._get_formatter()._expand_help(action)
                assert "default" in text.lower(), f"`{path}` {action.option_strings}: no default shown"


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_top_level_train_and_synthetic_help(capsys):
    top = _help(capsys)
    assert "vtok trains visual tokenizers" in top and "The ``vtok``" not in top
    train = _help(capsys, "train")
    assert "recipe path to a recipe YAML, e.g. recipes/smoke/fqgan_dual.yaml" in train
    assert "run_dir" in train and "runs/<recipe name>" in train and "resumes" in train
    syn = _help(capsys, "data", "synthetic")
    assert "--num-samples NUM_SAMPLES images to write (default: 2048)" in syn
    assert "--format {wds,mds} shard format: WebDataset tars or MosaicML MDS (default: wds)" in syn


# ---- progress bar and log lines ------------------------------------------------------------------
def screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: each line with its carriage returns overwriting from the
    first column (tqdm redraws and clears a bar that way), trailing blanks dropped."""
    lines = []
    for line in text.split("\n"):
        cells: list[str] = []
        for part in line.split("\r"):
            cells[:len(part)] = part
        lines.append("".join(cells).rstrip())
    return [line for line in lines if line]


def test_bar_postfix_names_each_phase_loss():
    two = ("generator", "discriminator")
    shown = bar_postfix({"generator/loss": 0.25, "generator/rec": 0.1, "discriminator/loss": 1.0,
                         "samples_per_s": 12.0, "generator/lr": 1e-3}, two)
    assert shown == {"g_loss": "0.25", "d_loss": "1", "samples_per_s": "12"}
    assert bar_postfix({"generator/loss": 0.5}, two) == {"g_loss": "0.5"}  # before the disc starts
    assert bar_postfix({"main/loss": 0.5}, ("main",)) == {"loss": "0.5"}
    assert set(bar_postfix({"gen/loss": 1.0, "gan/loss": 2.0}, ("gen", "gan"))) == {"gen_loss", "gan_loss"}


def test_log_line_goes_above_the_bar_not_onto_it():
    from tqdm import tqdm

    stream = io.StringIO()
    handler = TqdmLoggingHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("vtok.test_cli_output")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        bar = tqdm(total=4, desc="run", file=stream, mininterval=0, ascii=True)
        bar.update(2)
        logger.warning("saved checkpoint x")
        bar.update(2)
        bar.close()
    finally:
        logger.removeHandler(handler)
    shown = screen(stream.getvalue())
    assert shown[0] == "WARNING saved checkpoint x"
    assert len(shown) == 2 and shown[1].startswith("run: 100%")


@contextmanager
def log_to(stream: io.StringIO):
    handler = TqdmLoggingHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("vtok.train")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_training_output_bar_once_with_phase_losses_and_save_status(shards, tmp_path, capsys):
    """A two-phase run with a checkpoint mid-way and at the end: the terminal shows the log lines
    each on its own line, one final bar (the last line), g_loss/d_loss, and a save status."""
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-gan", tmp_path / "run", steps=4)
    trainer = Trainer(load_recipe(recipe, ["log.progress=true"]))
    capsys.readouterr()
    with log_to(sys.stderr):
        trainer.fit()
    raw = capsys.readouterr().err
    shown = screen(raw)
    saved = [line for line in shown if "saved checkpoint" in line]
    assert len(saved) == 2 and all(line.startswith("INFO vtok.train: saved checkpoint") for line in saved)
    bars = [line for line in shown if "%|" in line]
    assert len(bars) == 1 and shown[-1] == bars[0] and "4/4" in bars[0], shown  # the final bar, once
    assert "g_loss=" in bars[0] and "d_loss=" in bars[0] and " loss=" not in raw and ",loss=" not in raw
    assert "[saving checkpoint...]" in raw


def test_evaluation_pass_shows_a_status(shards, tmp_path, capsys, monkeypatch):
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=2)
    trainer = Trainer(load_recipe(recipe, ["log.progress=true", "train.eval_every=2"]))
    seen = []

    def evaluate(step, run_dir):
        seen.append(trainer_bar_description())
        return {"score": 1.0}

    def trainer_bar_description():
        from tqdm import tqdm

        return [b.desc for b in list(tqdm._instances)]

    monkeypatch.setattr(trainer.task, "evaluate", evaluate)
    trainer.fit()
    assert seen and any("evaluating at step 2" in d for d in seen[0]), seen
    # without a bar: one log line says it
    recipe = write_train_recipe(tmp_path / "q.yaml", shards["mds"], "tiny-ae", tmp_path / "run2", steps=2)
    trainer = Trainer(load_recipe(recipe, ["train.eval_every=2"]))
    monkeypatch.setattr(trainer.task, "evaluate", lambda step, run_dir: {"score": 1.0})
    stream = io.StringIO()
    with log_to(stream):
        trainer.fit()
    assert "evaluating at step 2..." in stream.getvalue()


# ---- summaries -----------------------------------------------------------------------------------
def test_summary_block_aligns_and_skips_empty_rows():
    text = summary("vtok x: done", [("run dir", "r"), ("checkpoint", None), ("metrics file", "r/m.jsonl")])
    assert text.splitlines() == ["vtok x: done", "  run dir       r", "  metrics file  r/m.jsonl"]


def test_vtok_train_ends_with_a_summary(shards, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", run, steps=2)
    assert main(["train", recipe]) == 0
    out = capsys.readouterr().out
    assert f"vtok train: complete at step 2; run dir {run}" in out  # the line scripts grep for
    assert f"checkpoint  {run / 'checkpoints' / 'step_000000002'}" in out
    assert f"metrics     {run / 'metrics.jsonl'}" in out and f"config      {run / 'config.yaml'}" in out


# ---- missing smoke data --------------------------------------------------------------------------
def test_smoke_recipe_in_an_empty_dir_names_the_command_that_writes_its_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(ROOT / "recipes" / "smoke" / "fqgan_dual.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard not found: vtok_demo/wds" in err
    assert "`vtok data synthetic vtok_demo/wds`" in err and "vtok demo" in err
    assert "vtok data synthetic vtok_demo/wds" in (ROOT / "recipes" / "smoke" / "shapes_data.yaml").read_text()


def test_missing_shard_errors_name_the_writer(tmp_path, monkeypatch):
    from vtok.data.mds import open_streaming
    from vtok.data.shards import read_shard_meta
    from vtok.data.webdataset import expand_shards

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"vtok data synthetic vtok_demo/mds --format mds"):
        open_streaming("vtok_demo/mds", "", batch_size=2, seed=0, shuffle=False)
    with pytest.raises(DataError, match=r"data_prep/make_shards.py --images IMAGE_DIR --out data/in1k\b"):
        expand_shards("data/in1k/train-{000000..000003}.tar")
    with pytest.raises(RecipeError, match=r"vtok demo --out vtok_demo.*vtok precompute codes"):
        read_shard_meta("vtok_demo/codes", "codes.json", "codes", "model.codes_meta")
    with pytest.raises(RecipeError, match=r"`vtok precompute latents --data IMAGE_SHARDS --out lat"):
        read_shard_meta("lat", "latents.json", "latents", "model.latents_meta")


# ---- file modes ----------------------------------------------------------------------------------
@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_and_export_files_respect_the_umask(shards, tmp_path, mask, expected):
    from vtok.models.export import save_export
    from vtok.models.registry import MODELS

    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-gan", tmp_path / "run", steps=2)
    with umask(mask):
        trainer = Trainer(load_recipe(recipe, ["train.ema.decay=0.9"]))
        trainer.fit()
        entry = MODELS["vqgan-tiny"]
        weights = save_export(tmp_path / "export", entry.model(entry.config), "vqgan-tiny")
    step = tmp_path / "run" / "checkpoints" / "step_000000002"
    tensors = sorted(step.glob("*.safetensors"))
    assert {p.name for p in tensors} >= {"model-generator.safetensors", "model-disc.safetensors",
                                         "ema-generator.safetensors"}
    for path in [*step.iterdir(), weights, weights.with_name("config.json")]:
        assert mode(path) == expected, f"{path.name}: {oct(mode(path))}"
    saved = load_file(str(step / "model-disc.safetensors"))  # still readable, same weights
    assert torch.equal(trainer.strategy.raw["disc"].state_dict()["net.0.weight"].cpu(), saved["net.0.weight"])
