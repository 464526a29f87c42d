"""Real 2-process runs under torchrun (gloo): every sample exactly once over 2 ranks x 2 workers."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import NUM_SAMPLES

SCRIPT = Path(__file__).with_name("dist_read_keys.py")


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_torchrun_two_ranks_two_workers_exactly_once(shards, tmp_path, fmt):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), fmt, shards[fmt], str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [(tmp_path / f"{fmt}-rank{r}.txt").read_text().split() for r in range(2)]
    assert all(per_rank), "both ranks read samples"
    keys = per_rank[0] + per_rank[1]
    assert Counter(keys).most_common(1)[0][1] == 1
    assert set(keys) == {f"{i:08d}" for i in range(NUM_SAMPLES)}
