"""Training machinery: the loop, checkpoints, evaluation, data-parallel launch and export.

The main entry points::

    from avdsl.runtime.train import TrainConfig, train, evaluate, export, launch
    summary = train(model, train_set, val_set, TrainConfig(steps=100, run_dir="runs/x"), spec_text, spec_hash)
"""
from .checkpoint import (
    CheckpointCorrupt,
    CheckpointMismatch,
    CheckpointWriteError,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import launch, setup_distributed
from .evaluate import evaluate
from .export import ExportError, export, load_exported
from .loop import NonFiniteLoss, train
from .report import RunSummary

__all__ = [
    "CheckpointCorrupt",
    "CheckpointMismatch",
    "CheckpointWriteError",
    "ExportError",
    "NonFiniteLoss",
    "RunSummary",
    "TrainConfig",
    "evaluate",
    "export",
    "find_latest",
    "launch",
    "load_checkpoint",
    "load_exported",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
