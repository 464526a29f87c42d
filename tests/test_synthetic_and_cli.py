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
