"""The settings of one training run, as a plain dataclass.

Every field is a plain value (int, float, str, bool) so that the whole config can be stored inside a
checkpoint that is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PRECISIONS = ("fp32", "bf16", "bf16w")
STRATEGIES = ("ddp", "fsdp")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """How to train: optimisation, evaluation, checkpointing and logging cadence.

    Step counts are optimizer steps. ``eval_every``, ``checkpoint_every`` and ``log_every`` of 0
    turn that action off during the run (a final evaluation and a final checkpoint still happen).
    """

    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "bf16w" (bf16 weights, fp32 masters: train/master.py)
    compile: bool = False  # wrap the model in torch.compile
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    workers: int = 0  # DataLoader worker processes
    log_every: int = 10
    on_nonfinite: str = "stop"  # "stop" | "skip"
    resume: bool = False  # continue from the newest complete checkpoint in run_dir
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
    strategy: str = "ddp"  # with several processes: "ddp" (replicas) | "fsdp" (sharded with fully_shard)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}"
            )
        for name in ("steps", "batch_size", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "log_every", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict:
        """The config as a plain dict (for checkpoints, summaries and logs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config from a dict, refusing unknown keys so that typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)
