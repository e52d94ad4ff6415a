"""Models: layers (feature input, parallel MLP banks, extraction layers), the model family, the registry."""

from plerec.models.family import MODELS, ModelConfig, MultiTaskModel, build_model, model_config, stack_single_task

__all__ = ["MODELS", "ModelConfig", "MultiTaskModel", "build_model", "model_config", "stack_single_task"]
