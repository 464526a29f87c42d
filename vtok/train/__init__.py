"""Training: the Trainer loop, TrainTask registry, optimizers and schedules, EMA, checkpoints, logs."""
from vtok.train.task import TASKS, TrainTask, build_task, register_task
from vtok.train.trainer import Trainer, TrainingError

__all__ = ["TASKS", "TrainTask", "Trainer", "TrainingError", "build_task", "register_task"]
