"""Recipe sections as dataclasses. Defaults are what a single-node run should use.

A field's ``metadata["choices"]`` lists its valid values; the recipe loader enforces them.
Required fields have the omegaconf ``MISSING`` default (``???``) and fail loudly when unset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


def choice(default: str, *choices: str, doc: str = ""):
    """A string field restricted to ``choices`` (checked when a recipe is loaded)."""
    return field(default=default, metadata={"choices": (default, *choices), "doc": doc})


@dataclass
class DataConfig:
    """Where samples come from and how they become tensors (see DESIGN.md section 2)."""

    format: str = choice("wds", "mds", doc="shard format: WebDataset tars or MDS (mosaicml-streaming)")
    # wds: brace-expandable list of .tar paths or pipe: URLs, e.g. "data/train-{000000..000127}.tar".
    # mds: a local MDS directory (with index.json), or the local cache dir when `remote` is set.
    train_shards: str = MISSING
    eval_shards: str = ""
    remote: str = ""  # mds only: remote root (s3://, gs://, ...); `train_shards` is then the local cache.
    fields: list[str] = field(default_factory=lambda: ["image", "cls"])  # schema fields to load
    resolution: int = 256  # square crop side, pixels
    crop: str = choice("center", "random")
    hflip: bool = False  # random horizontal flip (training only)
    channels_last: bool = False  # return images in torch.channels_last memory format
    small_images: str = choice("error", "upscale", "skip", doc="image shorter than `resolution`")
    decoder: str = choice("simplejpeg", "pil", doc="JPEG decoder; other formats always use PIL")
    batch_size: int = 32  # per rank
    num_workers: int = 4  # DataLoader workers per rank
    prefetch_factor: int = 2
    pin_memory: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 1000  # wds: samples held for in-worker shuffling
    max_bad_fraction: float = 0.001  # corrupt samples/shards tolerated before the run stops


@dataclass
class OptimConfig:
    """AdamW + schedule for one optimizer (a GAN has ``generator`` and ``discriminator``)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05  # never applied to norms, biases and embeddings
    schedule: str = choice("cosine", "constant")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    start_step: int = 0  # the optimizer steps only from this step on (e.g. a GAN discriminator)


@dataclass
class EmaConfig:
    decay: float = 0.0  # 0 disables EMA
    modules: list[str] = field(default_factory=list)  # task module names; empty = all trained modules
    every_steps: int = 1


@dataclass
class TrainConfig:
    """The optimisation loop (vtok/train/trainer.py)."""

    task: str = ""  # registered TrainTask name (vtok/train/task.py), e.g. "fqgan"
    steps: int = 1000
    global_batch_size: int = 0  # 0: data.batch_size x world size (no accumulation)
    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 disables
    precision: str = choice("fp32", "bf16", doc="bf16 autocast with fp32 master weights")
    # One entry per optimizer the task declares (missing ones get the defaults), e.g. train.optim.main.lr
    optim: dict[str, OptimConfig] = field(default_factory=dict)
    ema: EmaConfig = field(default_factory=EmaConfig)
    compile: bool = False  # torch.compile each trained module
    activation_checkpointing: bool = False
    max_bad_steps: int = 10  # consecutive NaN/inf losses before the run stops
    log_every: int = 10
    eval_every: int = 0  # 0 disables the task's eval hook
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look up known GPUs, else MFU is not reported


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    # merged into the generated DeepSpeed config, e.g. {zero_optimization: {offload_param: {device: cpu}}}
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    strategy: str = choice("ddp", "fsdp2", "deepspeed")
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    fsdp_param_dtype: str = choice("fp32", "bf16", doc="FSDP2 MixedPrecisionPolicy param dtype")
    # ranks per FSDP2 shard group: 0 = all ranks (full sharding); e.g. 8 = shard within each 8-GPU node
    # and replicate across nodes (hybrid sharding, HSDP: gathers stay on the node's fast links)
    fsdp_shard_size: int = 0
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    backend: str = choice("auto", "gloo", "nccl")
    # how long a collective waits for the other ranks; then the run stops, naming the ranks that did not
    # arrive (a hung or dead rank), and can be resumed from its last checkpoint
    timeout_minutes: float = 30.0


@dataclass
class CkptConfig:
    every_steps: int = 1000
    keep_last: int = 3
    dir: str = ""  # default: <run_dir>/checkpoints
    resume: str = ""  # a checkpoint dir; default: <dir>/latest when it exists
    # Resume from a checkpoint without vtok's file hashes in meta.json (not written by vtok, or by an
    # older one). FSDP2 (DCP) and DeepSpeed checkpoints unpickle their metadata: only your own.
    trust: bool = False


@dataclass
class LogConfig:
    progress: bool = True  # rank-0 progress bar
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "vtok"
    wandb_mode: str = choice("offline", "online")


@dataclass
class Recipe:
    """A whole run. Model sections are added by the model families."""

    name: str = "run"
    seed: int = 0
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The task's own settings (model size, loss weights), checked against its Config dataclass.
    model: dict[str, Any] = field(default_factory=dict)
