"""``mlxmoe plan``'s model of memory, from config.json alone: a training step's peak
(``training``, its activations in ``activations``), the load's (``load``) and the GGUF
export's (``training.plan_export``); whether it fits a Mac and what would make it fit
(``advice``)."""

from .advice import Budget, budget, suggestions, verdict
from .load import LoadPlan, plan_load
from .training import ExportPlan, ModelMemory, TrainingPlan, model_memory, plan_export, plan_training

__all__ = [
    "Budget",
    "ExportPlan",
    "LoadPlan",
    "ModelMemory",
    "TrainingPlan",
    "budget",
    "model_memory",
    "plan_export",
    "plan_load",
    "plan_training",
    "suggestions",
    "verdict",
]
