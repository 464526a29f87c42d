"""One rank of the plan-vs-measured check (run under torchrun): trains RECIPE for one step under each
strategy given and writes every rank's parameter / optimizer-state bytes to OUT (JSON)."""
import json
import sys

import torch

from vtok.config import load_recipe
from vtok.parallel.dist import shutdown_distributed
from vtok.plan.measure import measured_state
from vtok.train import Trainer

STRATEGIES = {"ddp": ["parallel.strategy=ddp"], "fsdp2": ["parallel.strategy=fsdp2"],
              "hsdp": ["parallel.strategy=fsdp2", "parallel.fsdp_shard_size=1"],
              **{f"zero{k}": ["parallel.strategy=deepspeed", f"parallel.deepspeed.zero_stage={k}"] for k in (1, 2, 3)}}

if __name__ == "__main__":
    recipe_path, out, names, *overrides = sys.argv[1:]
    results = {}
    for name in names.split(","):
        recipe = load_recipe(recipe_path, [*overrides, *STRATEGIES[name], f"run_dir={out}.{name}"])
        trainer = Trainer(recipe)
        trainer.fit()
        results[name] = measured_state(trainer.strategy)
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, results)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(ranks, f)
    shutdown_distributed()  # else gloo's threads can abort the interpreter's exit (SIGABRT)
