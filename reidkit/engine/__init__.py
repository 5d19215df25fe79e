"""Training engine: the training loop, checkpoints, feature extraction, evaluation, DDP."""

from reidkit.engine.checkpoint import atomic_save, load_checkpoint, load_model
from reidkit.engine.evaluator import EvalResult, evaluate_feature_sets, evaluate_model
from reidkit.engine.extract import FeatureSet, extract_features
from reidkit.engine.step import NonFiniteLossError, StepContext
from reidkit.engine.trainer import Trainer, train

__all__ = [
    "train",
    "load_model",
    "extract_features",
    "evaluate_model",
    "evaluate_feature_sets",
    "EvalResult",
    "FeatureSet",
    "NonFiniteLossError",
    "StepContext",
    "Trainer",
    "atomic_save",
    "load_checkpoint",
]
