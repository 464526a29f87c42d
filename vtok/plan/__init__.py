"""``vtok plan``: will a recipe fit on a cluster, and how long and how much will it take?

    from vtok.plan import make_plan
    plan = make_plan(recipe, gpu="H100", gpus=64)
    print(plan.table())                  # strategies that fit first, fastest first
    plan.as_dict()                       # what --json prints

The model is measured, not estimated per family: profile.py runs the recipe's own task on the
``meta`` device (FLOPs by torch's counter, activation bytes from what autograd saves); memory.py
turns that into per-GPU memory for each strategy and a step time at a stated MFU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vtok.config import Recipe, RecipeError
from vtok.plan.gpus import GPU, find_gpu, load_gpus
from vtok.plan.memory import GIB, HEADROOM, Cluster, Option, plan_options, state_bytes
from vtok.plan.profile import TaskProfile, profile_recipe

__all__ = ["GPU", "Cluster", "Option", "Plan", "TaskProfile", "find_gpu", "load_gpus", "make_plan",
           "plan_options", "profile_recipe", "state_bytes"]


@dataclass
class Plan:
    """A profiled recipe on a cluster: the model's numbers and every strategy's memory and time."""

    recipe: str
    profile: TaskProfile
    cluster: Cluster
    steps: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    options: list[Option]

    def as_dict(self) -> dict[str, Any]:
        p = self.profile
        return {
            "recipe": self.recipe, "task": p.task, "precision": p.precision,
            "gpu": asdict(self.cluster.gpu), "gpus": self.cluster.gpus, "gpus_per_node": self.cluster.gpus_per_node,
            "mfu": self.cluster.mfu, "headroom": HEADROOM, "steps": self.steps, "global_batch": self.global_batch,
            "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
            "trainable_params": p.params, "frozen_bytes": p.frozen_bytes,
            "flops_per_sample": p.flops_per_sample, "forward_flops_per_sample": p.forward_flops_per_sample,
            "activation_bytes_per_micro_batch": p.activation_bytes(False),
            "activation_bytes_per_micro_batch_checkpointed": p.activation_bytes(True),
            "modules": {k: asdict(v) for k, v in p.modules.items()},
            "options": [o.as_dict() for o in self.options],
        }

    def table(self) -> str:
        """The plan as text: a header with the model's numbers and one row per option, best first."""
        p, c = self.profile, self.cluster
        lines = [
            f"vtok plan: {self.recipe} (task {p.task}, {p.precision}) on {c.gpus} x {c.gpu.name} "
            f"({c.gpu.memory_gib:g} GiB, {c.gpu.bf16_tflops:g} bf16 TFLOP/s), {c.gpus_per_node} per node",
            f"  trainable parameters {p.params / 1e6:,.1f}M ({', '.join(f'{k} {m.params / 1e6:,.1f}M' for k, m in p.modules.items())}); "
            f"frozen modules {p.frozen_bytes / GIB:.2f} GiB",
            f"  FLOPs per sample (forward + backward, torch's counter on meta) {p.flops_per_sample / 1e9:,.1f} G",
            f"  batch: global {self.global_batch} = micro {self.micro_batch} x {c.gpus} GPUs x {self.grad_accum} "
            f"accumulation; {self.steps:,} steps; activations per micro-batch {p.activation_bytes(False) / GIB:.2f} GiB "
            f"({p.activation_bytes(True) / GIB:.2f} GiB checkpointed)",
            f"  step time at MFU {c.mfu:.0%} (communication not modelled); fits: total <= {HEADROOM:.0%} of memory",
            "",
        ]
        cost = c.gpu.price_per_hour > 0
        head = ["strategy", "ckpt", "params", "grads", "optim", "activ", "buffers", "frozen", "total GiB",
                "fits", "step s", "samples/s", "days", "GPU-h"] + (["cost"] if cost else [])
        rows = []
        for o in self.options:
            row = [o.strategy, "yes" if o.checkpointing else "no",
                   *(f"{v / GIB:.2f}" for v in (o.params, o.grads, o.optimizer, o.activations, o.working,
                                                o.frozen, o.total)),
                   "yes" if o.fits else "NO", f"{o.step_s:.3f}", f"{o.samples_per_s:,.0f}", f"{o.days:.2f}",
                   f"{o.gpu_hours:,.0f}"] + ([f"{o.cost:,.0f}"] if cost else [])
            rows.append(row)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        for r in [head] + rows:
            lines.append("  " + "  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
        best = next((o for o in self.options if o.fits), None)
        lines.append("")
        lines.append(f"best: {' '.join(best.overrides)}" if best else
                     "nothing fits: lower data.batch_size (with train.global_batch_size kept, accumulation "
                     "makes up the rest) or use more GPUs")
        return "\n".join(lines)


def make_plan(recipe: Recipe, *, gpu: str, gpus: int, gpus_per_node: int = 8, mfu: float = 0.4,
              gpu_table: str = "", recipe_name: str = "") -> Plan:
    """Profile ``recipe`` and plan it on ``gpus`` x ``gpu``."""
    from vtok.train.trainer import grad_accum_steps

    if gpus < 1:
        raise RecipeError(f"--gpus {gpus}: expected at least 1")
    if not 0 < mfu <= 1:
        raise RecipeError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
    if not recipe.train.task:
        raise RecipeError("the recipe names no train.task: nothing to plan")
    cluster = Cluster(find_gpu(gpu, gpu_table), gpus, gpus_per_node, mfu)
    micro = recipe.data.batch_size
    accum = grad_accum_steps(recipe, gpus)  # the trainer's rule (and its one-line error)
    global_batch = micro * gpus * accum
    prof = profile_recipe(recipe, micro)
    param_bytes = 2 if recipe.parallel.fsdp_param_dtype == "bf16" else 4
    options = plan_options(prof, cluster, steps=recipe.train.steps, global_batch=global_batch,
                           fsdp_param_bytes=param_bytes)
    return Plan(recipe_name or recipe.name, prof, cluster, recipe.train.steps, global_batch, micro,
                accum, options)
