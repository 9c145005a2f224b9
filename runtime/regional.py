"""Regional compilation: compile one encoder layer and reuse it for every layer like it.

A spec's encoders repeat one layer (``encoder.Block``) a dozen times. ``torch.compile`` of the whole
model traces and code-generates every copy; compiling ``Block.forward`` instead gives one graph per
distinct layer *kind* (weight set, routing of that layer, token counts), which every layer of that kind
reuses: the parameters are graph inputs, so twelve layers with the same plan hit the same compiled
code. Only the layers run compiled; embeddings, masking and losses stay eager (little of the work).
This is PyTorch's "regional compilation" recipe; the compile cache (``compile_cache``) stores the
compiled layers like any other compiled code.
"""
from __future__ import annotations

import torch

from .encoder import Block


def compile_layers(model: torch.nn.Module, **options) -> int:
    """Compile every encoder layer of ``model`` in place (``Block.compile(**options)``, e.g.
    ``fullgraph=True``); returns how many layers were wrapped. The model is called as before."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(**options)
    return len(blocks)
