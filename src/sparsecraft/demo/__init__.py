"""``sparsecraft demo``: each stage shows one capability on the built-in digits task."""

from sparsecraft.demo.acceleration import acceleration_table, demo_models, run_acceleration_stage
from sparsecraft.demo.activations import ActivationStageRow, activation_stage_table, run_activation_stage, activation_stage_models
from sparsecraft.demo.language_model import LanguageModelStageConfig, language_model_table, prune_language_model, run_language_model_stage
from sparsecraft.demo.one_shot import DemoConfig, DemoRow, demo_table, run_demo
from sparsecraft.demo.training import TrainingStageConfig, plot_training_stage, run_training_stage, training_table

__all__ = [
    "ActivationStageRow", "activation_stage_table", "run_activation_stage", "activation_stage_models",
    "acceleration_table", "demo_models", "prune_language_model", "run_acceleration_stage",
    "DemoConfig", "DemoRow", "LanguageModelStageConfig", "language_model_table", "run_language_model_stage", "TrainingStageConfig", "demo_table", "plot_training_stage", "run_demo",
    "run_training_stage", "training_table",
]
