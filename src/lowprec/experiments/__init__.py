"""Recipes -> runs -> result tables, plots, logs, checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compare import compare, format_table, plot_runs
from .recipes import Recipe, parse_recipe
from .runner import RunResult, evaluate, run
from .sweep import Cell, expand_grid, parse_grid_values, sweep
from .tasks import TASKS, Task, TaskData, get_task, load_task_data
from .underflow import GradientCensus, gradient_census

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "compare", "format_table", "plot_runs",
    "Recipe", "parse_recipe", "RunResult", "evaluate", "run", "TASKS", "Task", "TaskData", "get_task",
    "load_task_data", "GradientCensus", "gradient_census", "Cell", "expand_grid", "parse_grid_values", "sweep",
]
