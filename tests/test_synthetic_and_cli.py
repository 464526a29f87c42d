"""The built-in synthetic dataset and the `vtok` commands that use it."""
import subprocess
import sys

import numpy as np
from pathlib import Path

from vtok.data.synthetic import (BACKGROUNDS, CLASS_NAMES, COLORS, NUM_CLASSES, SHAPES, class_id,
                                 render_sample)


def test_samples_are_deterministic_and_cover_classes():
    a, b = render_sample(5, 48, seed=1), render_sample(5, 48, seed=1)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1:] == b[1:]
    assert not np.array_equal(np.asarray(a[0]), np.asarray(render_sample(5, 48, seed=2)[0]))
    classes = {render_sample(i, 16)[1] for i in range(400)}
    assert classes == set(range(NUM_CLASSES)) and len(CLASS_NAMES) == NUM_CLASSES


def test_caption_and_class_describe_the_pixels():
    for i in range(40):
        img, cls, caption = render_sample(i, 64)
        shape, color = SHAPES[cls // len(COLORS)], list(COLORS)[cls % len(COLORS)]
        assert f"{color} {shape}" in caption and CLASS_NAMES[cls] == f"{color} {shape}"
        assert class_id(shape, color) == cls
        bg = next(name for name in BACKGROUNDS if caption.endswith(f"on a {name} background"))
        pixels = np.asarray(img).reshape(-1, 3).astype(int)
        # The shape's colour is present: some pixels are close to it, and far from the background.
        near_fg = np.abs(pixels - COLORS[color]).sum(1) < 60
        assert near_fg.mean() > 0.03, caption
        assert np.abs(np.array(BACKGROUNDS[bg]) - COLORS[color]).sum() > 150


def run_vtok(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vtok.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_data_commands_and_info(tmp_path):
    out = tmp_path / "syn"
    assert run_vtok("data", "synthetic", out, "--num-samples", 10, "--samples-per-shard", 5,
                    "--resolution", 16, "--format", "mds").returncode == 0
    proc = run_vtok("data", "inspect", out)
    assert "mds, 2 shards, 10 samples" in proc.stdout and "caption" in proc.stdout
    root = Path(__file__).resolve().parent.parent
    proc = run_vtok("info", "recipes/smoke/shapes_data_mds.yaml", "data.batch_size=3", cwd=root)
    assert proc.returncode == 0 and "format: mds" in proc.stdout and "batch_size: 3" in proc.stdout
    missing = run_vtok("data", "inspect", tmp_path / "nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def _subparsers(parser, path=()):
    """(command path, parser) for every (nested) subcommand of ``parser``."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_help_works_for_every_subcommand(capsys):
    import pytest

    from vtok.cli import build_parser

    commands = [path for path, _ in _subparsers(build_parser())]
    assert {("demo",), ("sample",), ("train",), ("eval", "gen"), ("data", "inspect")} <= set(commands)
    for path in [(), *commands]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert capsys.readouterr().out.startswith("usage: vtok"), path


def test_sample_and_demo_flags_come_from_their_option_dataclasses():
    import dataclasses

    from vtok.cli import DEMO_HELP, SAMPLE_HELP, build_parser, dataclass_from_args
    from vtok.demo import DemoOptions
    from vtok.eval.sample import SampleOptions

    parsers = dict(_subparsers(build_parser()))
    for name, cls, cli_help in (("sample", SampleOptions, SAMPLE_HELP), ("demo", DemoOptions, DEMO_HELP)):
        actions = {a.dest: a for a in parsers[(name,)]._actions}
        for f in dataclasses.fields(cls):
            action = actions[f.name]
            assert action.option_strings == ["--" + f.name.replace("_", "-")]
            assert action.default == f.default, (name, f.name)
            assert action.help == f.metadata.get("help", cli_help.get(f.name)), (name, f.name)
    sample = parsers[("sample",)]
    assert sample._option_string_actions["--dtype"].choices == ("fp32", "bf16", "fp16")
    assert sample._option_string_actions["--guidance-schedule"].choices == ("constant", "linear")
    assert sample._option_string_actions["--guidance"].help == "CFG scale; 1 disables guidance"
    assert parsers[("demo",)]._option_string_actions["--out"].help == "output directory (default: vtok_demo)"

    parser = build_parser()
    args = parser.parse_args(["sample", "--generator", "g", "--tokenizer", "t", "--out", "o", "--top-k", "5",
                              "--dtype", "bf16", "--per-class", "2"])
    assert dataclass_from_args(SampleOptions, args) == SampleOptions(top_k=5, dtype="bf16")
    assert args.per_class == 2 and args.npz is False
    assert dataclass_from_args(DemoOptions, parser.parse_args(["demo"])) == DemoOptions()
    args = parser.parse_args(["demo", "--guidance", "1.5", "--tokenizer-steps", "7", "--out", "d"])
    assert dataclass_from_args(DemoOptions, args) == DemoOptions(out="d", guidance=1.5, tokenizer_steps=7)


def test_add_dataclass_args_bools_required_and_overrides():
    import argparse
    import dataclasses

    import pytest

    from vtok.cli import add_dataclass_args, dataclass_from_args

    @dataclasses.dataclass
    class Opts:
        name: str
        fast: bool = False
        cache: bool = dataclasses.field(default=True, metadata={"help": "keep a cache"})
        mode: str = "a"
        ratio: float = 0.5

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts, help={"mode": "which mode"}, choices={"mode": ("a", "b")})
    assert parser._option_string_actions["--no-cache"].help == "keep a cache"
    assert parser._option_string_actions["--mode"].help == "which mode"
    got = dataclass_from_args(Opts, parser.parse_args(["--name", "x", "--fast", "--no-cache", "--ratio", "2"]))
    assert got == Opts(name="x", fast=True, cache=False, ratio=2.0)
    assert dataclass_from_args(Opts, parser.parse_args(["--name", "y"])) == Opts(name="y")
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "x", "--mode", "c"])  # not a choice
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --name is required

    @dataclasses.dataclass
    class Bad:
        items: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="Bad.items"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)


def test_a_command_leaves_its_process_group_before_exit():
    """`vtok COMMAND` destroys the process group it ran in before returning: left to interpreter
    finalization, Gloo's worker threads can abort a finished rank (SIGABRT, "terminate called without
    an active exception"), which torchrun reports as a failed job."""
    import torch.distributed as dist

    from vtok.cli import main

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        assert main(["info", str(Path(__file__).parents[1] / "recipes" / "smoke" / "dit_shapes.yaml"),
                     "--get", "train.steps"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
