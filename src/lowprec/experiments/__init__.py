"""Recipes -> runs -> result tables, plots, logs, checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compare import compare, format_table, plot_runs, run_dir_name
from .gan import GanResult, GanSettings, gan_experiment, load_gan_data, train_gan
from .gan_scores import class_scores, frechet_distance
from .recipes import Recipe, parse_recipe
from .rundir import RunDirectoryError
from .runner import RunResult, evaluate, run
from .sweep import Cell, expand_grid, parse_grid_values, sweep
from .tasks import TASKS, Task, TaskData, get_task, load_task_data
from .underflow import GradientCensus, gradient_census

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "compare", "format_table", "plot_runs", "run_dir_name",
    "RunDirectoryError",
    "Recipe", "parse_recipe", "RunResult", "evaluate", "run", "TASKS", "Task", "TaskData", "get_task",
    "load_task_data", "GradientCensus", "gradient_census", "Cell", "expand_grid", "parse_grid_values", "sweep",
    "GanResult", "GanSettings", "gan_experiment", "load_gan_data", "train_gan", "class_scores", "frechet_distance",
]
