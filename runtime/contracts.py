"""The two small contracts between a compiled model and the code that feeds and trains it.

A compiled avdsl model is an ``nn.Module`` built from a spec. Everything outside the model (data
sets, the training loop, evaluation, export) talks to it only through these types, so that each side
can be read and tested on its own.

Forward contract::

    out = model(**batch)        # batch: {input name: tensor with a leading batch dim}
    out["loss"]                 # scalar tensor, the weighted total of every named loss
    out["losses"]               # {loss name: scalar tensor}, each term as the spec names it
    out["outputs"]              # {output name: tensor}, every named output and head of the spec

and the model carries ``model.inputs: list[InputSpec]`` and ``model.eval_plan: EvalPlan``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# What an input holds, and so how data for it is rendered or decoded (per sample, no batch dim):
#   video      float [3, T, H, W]  frames, channels first, normalised to roughly zero mean, unit std
#   image      float [3, H, W]     one frame
#   fbank      float [T, F]        log-mel filterbank (T frames of 10 ms, F mel bins), normalised
#   waveform   float [S]           raw mono audio samples in [-1, 1]
#   text       long  [L]           token ids from the byte-level tokenizer (0 = padding)
#   label      long  []            class index in [0, classes)
#   multilabel float [classes]     0/1 targets
INPUT_KINDS = ("video", "image", "fbank", "waveform", "text", "label", "multilabel")


@dataclass(frozen=True)
class InputSpec:
    """One declared model input, batch dim left out of ``shape``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    classes: int | None = None  # for label / multilabel
    sample_rate: int | None = None  # for waveform (and the audio behind fbank), in Hz


@dataclass(frozen=True)
class RetrievalPair:
    """Two embedding outputs whose rows should match across the batch (a contrastive pair)."""

    query: str  # output name, e.g. "audio_embedding"
    key: str  # output name, e.g. "video_embedding"


@dataclass(frozen=True)
class Classifier:
    """An output of logits and the input holding its targets."""

    logits: str  # output name
    target: str  # input name (kind label or multilabel)
    multilabel: bool = False


@dataclass(frozen=True)
class EvalPlan:
    """What a held-out evaluation measures for this model, derived from its losses."""

    retrieval: tuple[RetrievalPair, ...] = ()
    classifiers: tuple[Classifier, ...] = ()
    reconstruction: tuple[str, ...] = field(default=())  # loss names reported as reconstruction error
    captioning: tuple[str, ...] = field(default=())  # loss names reported as caption loss
