"""Which outputs of a built model depend on which sources, measured with ``torch.func``.

The static information-flow analysis (``avdsl.lint.flow``) says, from the routing alone, which
inputs and streams each output and loss can see. This measures the same thing on the model: one
forward pass on a random batch under ``torch.func.vjp``, then for each output one vector-Jacobian
product with a random cotangent gives its gradient with respect to every floating-point input and
every stream's own parameters at once. A gradient that is exactly zero everywhere means no
dependence (a path the routing forbids contributes nothing, not something small); a random
cotangent makes an accidental zero of a real dependence a probability-zero event. Integer inputs
(token ids, class labels) have no gradient: they are redrawn, and an output depends on them when it
changes. Random operations (masking) draw the same numbers in every pass (fixed seed); the model
runs in eval mode, on one thread (a batch of two is too small to share, and on a busy machine
threads waiting for each other made it ten times slower).
"""
from __future__ import annotations

import torch
from torch.func import functional_call, vjp

from .trial import random_batch


def _targets(result: dict) -> dict[str, torch.Tensor]:
    """The float outputs and the losses of one forward pass, named ``output:NAME`` / ``loss:NAME``."""
    found = {f"output:{k}": v for k, v in result["outputs"].items() if torch.is_tensor(v) and v.is_floating_point()}
    found.update({f"loss:{k}": v for k, v in result["losses"].items()})
    return found


def dependence(model: torch.nn.Module, stream_params: dict[str, list[str]], batch_size: int = 2,
               seed: int = 0) -> dict[str, dict[str, bool]]:
    """{target: {source: depends}} for every float output and loss of ``model``.

    Sources are ``input:NAME`` for each declared input and ``stream:NAME`` for each stream in
    ``stream_params`` (the names of the parameters only that stream's modules hold).
    """
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)
    batch = random_batch(model.inputs, batch_size, torch.Generator().manual_seed(seed))
    floats = {k: v for k, v in batch.items() if v.is_floating_point()}
    others = {k: v for k, v in batch.items() if k not in floats}
    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update({k: v.detach() for k, v in model.named_buffers()})
    handles = {name: params[name] for names in stream_params.values() for name in names}

    def run(float_inputs: dict, own: dict, integer_inputs: dict = others) -> dict:
        torch.manual_seed(seed)  # the same random masks in every pass
        return _targets(functional_call(model, {**params, **own}, args=(), kwargs={**integer_inputs, **float_inputs}))

    try:
        with torch.random.fork_rng():
            outputs, pullback = vjp(run, floats, handles)
            found: dict[str, dict[str, bool]] = {t: {} for t in outputs}
            noise = torch.Generator().manual_seed(seed + 1)
            for target, value in outputs.items():
                cotangent = {t: torch.zeros_like(v) for t, v in outputs.items()}
                cotangent[target] = torch.randn(value.shape, generator=noise, dtype=value.dtype)
                by_input, by_param = pullback(cotangent)
                for name, grad in by_input.items():
                    found[target][f"input:{name}"] = bool(grad.ne(0).any())
                for stream, names in stream_params.items():
                    found[target][f"stream:{stream}"] = any(bool(by_param[n].ne(0).any()) for n in names)
            with torch.no_grad():
                for name, value in others.items():
                    redrawn = random_batch(model.inputs, batch_size, torch.Generator().manual_seed(seed + 2))[name]
                    if torch.equal(redrawn, value):
                        continue  # nothing to compare (a single-class label)
                    changed = run(floats, handles, {**others, name: redrawn})
                    for target, value_ in outputs.items():
                        found[target][f"input:{name}"] = not torch.equal(changed[target], value_)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return found
