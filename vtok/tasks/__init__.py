"""Built-in TrainTasks; importing this package registers them (``train.task: fqgan``, ...)."""
from vtok.tasks import dit, flextok, fqgan, gpt, textok  # noqa: F401
