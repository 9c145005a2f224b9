"""Regional compilation: compile one encoder layer and reuse it for every layer like it.

A spec's encoders repeat one layer (``encoder.Block``) a dozen times. ``torch.compile`` of the whole
model traces and code-generates every copy; compiling ``Block.forward`` instead gives one graph per
distinct layer *kind* (weight set, routing of that layer, token counts), which every layer of that kind
reuses: the parameters are graph inputs, so twelve layers with the same plan hit the same compiled
code. Only the layers run compiled; embeddings, masking and losses stay eager (little of the work).
This is PyTorch's "regional compilation" recipe; the compile cache (``compile_cache``) stores the
compiled layers like any other compiled code.

On a CPU, inductor's default output is a Python function calling one C++ library per fused kernel,
each built by its own compiler run (about 30 for CAV-MAE's three layer kinds, forward and backward,
44 s of g++ on 2 cores). `CPU_OPTIONS` asks for its C++ wrapper instead, the kernels of a graph in
one library and the code calling them in another, built at a lower optimisation level (26 compiler
runs, 21 s), which also takes the Python out of every kernel call.
"""
from __future__ import annotations

import torch

from .encoder import Block

# inductor options for layers compiled for a CPU (see the module docstring); on a GPU the defaults stay
CPU_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


def compile_layers(model: torch.nn.Module, **options) -> int:
    """Compile every encoder layer of ``model`` in place (``Block.compile(**options)``, e.g.
    ``fullgraph=True``); returns how many layers were wrapped. The model is called as before.
    Compiled by inductor for a CPU (the model's parameters are there), the layers get `CPU_OPTIONS`."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and options.get("backend", "inductor") == "inductor":
        options = {**options, "options": {**CPU_OPTIONS, **options.get("options", {})}}
    for block in blocks:
        block.compile(**options)
    return len(blocks)
