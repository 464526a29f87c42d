"""`vtok train --engine composer`: a vtok recipe under MosaicML Composer's Trainer gives vtok's own
losses step for step: in one process (fp32 with gradient accumulation, CPU bf16), after a resume
through Composer's checkpoints (autoresume and --resume), under DDP and FSDP2 at 2 ranks (gloo), and
one-line errors for what it does not run or when Composer is missing."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("composer")  # a guard only: CI installs it (README, "Composer")

from conftest import ROOT, read_metrics, run_vtok, write_train_recipe  # noqa: E402
from test_gpt_task import CLASSES, SMOKE, write_code_shards  # noqa: E402
from tiny_tasks import TinyGANTask  # noqa: E402  (importing registers tiny-ae and tiny-gan)
from vtok.cli import main  # noqa: E402
from vtok.config import load_recipe  # noqa: E402
from vtok.integrations import COMPOSER_INSTALL, composer_trainer  # noqa: E402
from vtok.train import TASKS, Trainer, TrainingError  # noqa: E402

# 128 code samples; 8 per micro-batch, 2 micro-batches per step: an epoch is 8 steps, so 10 steps
# cross an epoch boundary.
STEPS = 10
LOGGED = ("main/loss", "main/ce0", "main/ce1", "main/lr", "main/grad_norm")


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    return write_code_shards(tmp_path_factory.mktemp("codes"), flip=False)


def overrides(shards, run_dir, *extra) -> list[str]:
    """The smoke FAR recipe, tiny, on the code shards; dropout on, so the RNG streams matter."""
    return [f"data.train_shards={shards}", "data.batch_size=8", "data.num_workers=0", f"run_dir={run_dir}",
            "log.progress=false", "log.tensorboard=false", "train.log_every=1", f"model.num_classes={CLASSES}",
            "train.optim.main.warmup_steps=2", "model.dropout=0.1", "train.eval_every=0", *extra]


def run_composer(recipe, **kwargs):
    trainer = composer_trainer(recipe, **kwargs)
    try:
        trainer.fit()
    finally:
        trainer.vtok_state.close_logger()
        trainer.close()
    return trainer


def logged(run_dir) -> dict[str, list[float]]:
    """metrics.jsonl's step lines (not the eval lines) as lists per key."""
    lines = [m for m in read_metrics(run_dir) if "main/loss" in m]
    return {"step": [m["step"] for m in lines], **{k: [m[k] for m in lines] for k in LOGGED}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_losses_equal_vtok_trainer_step_for_step(code_shards, tmp_path, one_thread, precision):
    common = [f"train.steps={STEPS}", "train.global_batch_size=16", f"train.precision={precision}",
              "train.ema.decay=0.9", "ckpt.every_steps=100"]
    ours = Trainer(load_recipe(SMOKE, overrides(code_shards, tmp_path / "vtok", *common)))
    ours.fit()
    theirs = run_composer(load_recipe(SMOKE, overrides(code_shards, tmp_path / "composer", *common)))
    a, b = logged(tmp_path / "vtok"), logged(tmp_path / "composer")
    assert b["step"] == list(range(1, STEPS + 1))
    # Measured: equal to the last bit (same init, data order, RNG draws, kernels, lr and clipping).
    for key in LOGGED:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), key
    assert b["main/loss"][-1] < b["main/loss"][0] - 0.5
    state = theirs.vtok_state
    for (n, p), q in zip(ours.strategy.raw["gpt"].named_parameters(), state.model.trained["gpt"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
    for n, t in ours.ema["gpt"].shadow.items():
        torch.testing.assert_close(state.ema["gpt"].shadow[n], t, rtol=1e-6, atol=1e-7, msg=n)
    assert (tmp_path / "composer" / "COMPLETE").read_text() == str(STEPS)
    assert (tmp_path / "composer" / "checkpoints-composer" / f"ba{STEPS}-rank0.pt").is_file()


def test_resume_through_composer_checkpoints_continues_exactly(code_shards, tmp_path, one_thread, capsys):
    common = [f"train.steps={STEPS}", "train.global_batch_size=16", "ckpt.every_steps=3", "train.ema.decay=0.9"]

    def args(run: str) -> list[str]:
        return overrides(code_shards, tmp_path / run, *common)

    run_composer(load_recipe(SMOKE, args("whole")))
    run_composer(load_recipe(SMOKE, args("parts")), max_duration="5ba")  # stopped after step 5
    folder = tmp_path / "parts" / "checkpoints-composer"
    assert sorted(p.name for p in folder.iterdir()) == ["ba3-rank0.pt", "ba5-rank0.pt", "latest-rank0.pt"]
    # the command resumes by itself from the newest checkpoint (step 5) ...
    assert main(["train", str(SMOKE), *args("parts"), "--engine", "composer"]) == 0
    assert "vtok train: complete at step 10 (Composer)" in capsys.readouterr().out
    # ... or from the one --resume names (step 3), into another run dir
    assert main(["train", str(SMOKE), *args("from3"), "--engine", "composer",
                 "--resume", str(folder / "ba3-rank0.pt")]) == 0
    assert main(["train", str(SMOKE), *args("parts"), "--engine", "composer"]) == 0  # already complete
    out, err = capsys.readouterr()
    assert "vtok train: complete at step 10 (Composer)" in out and "composer." not in err  # INFO kept quiet
    whole, parts, from3 = logged(tmp_path / "whole"), logged(tmp_path / "parts"), logged(tmp_path / "from3")
    assert parts["step"] == list(range(1, STEPS + 1)) and from3["step"] == list(range(4, STEPS + 1))
    for key in LOGGED:  # measured: equal to the last bit, across the epoch boundary at step 8
        assert parts[key] == pytest.approx(whole[key], rel=1e-6, abs=0), key
        assert from3[key] == pytest.approx(whole[key][3:], rel=1e-6, abs=0), key
    final = [torch.load(tmp_path / run / "checkpoints-composer" / f"ba{STEPS}-rank0.pt", weights_only=False)["state"]
             for run in ("whole", "parts")]
    for k, v in final[0]["model"].items():
        torch.testing.assert_close(final[1]["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    ema = [s["callbacks"]["VtokState"]["ema"]["gpt"] for s in final]
    for k, v in ema[0].items():
        torch.testing.assert_close(ema[1][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_non_finite_loss_skips_the_step_as_vtok_does(shards, tmp_path, one_thread):
    """tiny-ae on the uint8 image shards (MDS): NaN losses at steps 2 and 3 leave the weights and the
    optimizer alone in both engines; max_bad_steps in a row stop the run with vtok's error."""
    def recipe(run, *extra):
        path = write_train_recipe(tmp_path / f"{run}.yaml", shards["mds"], "tiny-ae", tmp_path / run, steps=5)
        return load_recipe(path, ["model.nan_at_steps=[1,2]", "ckpt.every_steps=100", *extra])

    Trainer(recipe("vtok")).fit()
    run_composer(recipe("composer"))
    a, b = read_metrics(tmp_path / "vtok"), read_metrics(tmp_path / "composer")
    assert [m["main/skipped"] for m in b] == [0.0, 1.0, 1.0, 0.0, 0.0]
    for key in ("main/loss", "main/grad_norm", "main/lr", "main/skipped", "bad_steps_in_a_row"):
        got, want = ([float(m[key]) for m in ms] for ms in (b, a))  # "nan" on skipped steps
        assert got == pytest.approx(want, rel=1e-6, abs=0, nan_ok=True), key
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite loss"):
        run_composer(recipe("stop", "train.max_bad_steps=2"))


DRIVER = """\
import sys
from vtok.cli import main
from vtok.config import load_recipe
from vtok.integrations import composer_trainer

# stop after step 3 (a checkpoint at 3), then `vtok train --engine composer` resumes at 2 ranks
trainer = composer_trainer(load_recipe(sys.argv[1], sys.argv[2:]), max_duration="3ba")
trainer.fit()
trainer.vtok_state.close_logger()
trainer.close()
sys.exit(main(["train", *sys.argv[1:], "--engine", "composer"]))
"""


@pytest.fixture(scope="module")
def two_rank_reference(code_shards, tmp_path_factory):
    """vtok's own trainer, DDP at 2 ranks, 6 steps (eval at 3 and 6): (overrides, run dir)."""
    run = tmp_path_factory.mktemp("vtok2")
    common = overrides(code_shards, run, "train.steps=6", "ckpt.every_steps=3", "train.eval_every=3")
    run_vtok("train", SMOKE, *common, "--engine", "vtok", nproc=2)
    return common, run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_with_a_resume_match_vtok_ddp(two_rank_reference, tmp_path, strategy):
    """gloo on CPU: Composer's DDP, and its FSDP2 (per-block fully_shard, DCP checkpoints), resumed
    from step 3 through Composer's checkpoint (both ranks' data positions and RNG)."""
    common, reference = two_rank_reference
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(SMOKE), *common, f"run_dir={tmp_path / 'run'}", f"parallel.strategy={strategy}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "complete at step 6 (Composer)" in proc.stdout
    a, b = logged(reference), logged(tmp_path / "run")
    assert b["step"] == [1, 2, 3, 4, 5, 6]
    # Measured: DDP equal to the last bit; FSDP2 within 2e-7 relative (fp32 rounding of the sharded
    # gradient reduction; vtok's own FSDP2 differs from its DDP by as much).
    for key in LOGGED:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), key
    evals = [m for m in read_metrics(tmp_path / "run") if "eval/sample_usage0" in m]
    assert [m["step"] for m in evals] == [3, 6]  # sampling on the (FSDP2: gathered) weights between steps
    saved = tmp_path / "run" / "checkpoints-composer"
    assert (saved / ("ep0-ba6" if strategy == "fsdp2" else "ba6-rank0.pt")).exists()


def test_what_composer_does_not_run_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    gan = write_train_recipe(tmp_path / "gan.yaml", str(tmp_path), "tiny-gan", tmp_path / "gan")
    ae = write_train_recipe(tmp_path / "ae.yaml", str(tmp_path), "tiny-ae", tmp_path / "ae")

    def error(*argv) -> str:
        assert main(["train", *argv, "--engine", "composer"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vtok: error: ") and "\n" not in err, err
        return err

    assert TASKS["tiny-gan"] is TinyGANTask
    err = error(gan)
    assert "one optimizer" in err and "'tiny-gan'" in err and "generator, discriminator" in err
    assert "--engine vtok" in err
    assert "no DeepSpeed" in error(ae, "parallel.strategy=deepspeed")
    assert "no CPU offload" in error(ae, "parallel.strategy=fsdp2", "parallel.fsdp_cpu_offload=true")
    assert "hybrid sharding is not mapped" in error(ae, "parallel.strategy=fsdp2", "parallel.fsdp_shard_size=1")
    assert "start_step=2" in error(ae, "train.optim.main.start_step=2")
    vtok_ckpt = tmp_path / "step_000000004"
    vtok_ckpt.mkdir()
    (vtok_ckpt / "meta.json").write_text("{}")
    assert "is a vtok checkpoint" in error(ae, "--resume", str(vtok_ckpt))
    assert "no such Composer checkpoint" in error(ae, "--resume", str(tmp_path / "nowhere.pt"))
    monkeypatch.setitem(sys.modules, "composer", None)  # as if it were not installed
    err = error(ae)
    assert "needs MosaicML Composer" in err and COMPOSER_INSTALL in err
    assert "pip install --no-deps mosaicml==0.32.1" in err


def test_train_help_names_the_engines_and_the_install_command_is_the_same_everywhere(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--engine {vtok,composer}" in text and "(default: vtok)" in text
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert COMPOSER_INSTALL in readme and f"&& {COMPOSER_INSTALL} && python -m pytest -q" in readme
    assert all(part in ci for part in COMPOSER_INSTALL.split(" && "))
