"""Run under torchrun: each rank reads one epoch with 2 workers and writes the keys it saw.

    torchrun --nproc_per_node=2 tests/dist_read_keys.py FORMAT SHARDS OUT_DIR
"""
import os
import sys
from pathlib import Path

import torch.distributed as dist

from vtok.config import load_recipe
from vtok.data import build_loader


def main() -> None:
    fmt, shards, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(None, [f"data.format={fmt}", f"data.train_shards={shards}",
                                "data.resolution=32", "data.batch_size=8", "data.num_workers=2"])
    loader = build_loader(recipe.data, rank=rank, world_size=world, seed=11)
    keys = [k for batch in loader for k in batch["__key__"]]
    (out / f"{fmt}-rank{rank}.txt").write_text("\n".join(keys))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
