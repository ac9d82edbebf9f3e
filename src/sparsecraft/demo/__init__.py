"""``sparsecraft demo``: each stage shows one capability on the built-in digits task."""

from sparsecraft.demo.language_model import LanguageModelStageConfig, language_model_table, run_language_model_stage
from sparsecraft.demo.one_shot import DemoConfig, DemoRow, demo_table, run_demo
from sparsecraft.demo.training import TrainingStageConfig, plot_training_stage, run_training_stage, training_table

__all__ = [
    "DemoConfig", "DemoRow", "LanguageModelStageConfig", "language_model_table", "run_language_model_stage", "TrainingStageConfig", "demo_table", "plot_training_stage", "run_demo",
    "run_training_stage", "training_table",
]
