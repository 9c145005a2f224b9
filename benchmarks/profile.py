"""Where a training step's time goes: the step's wall time split into kinds of work, and the top operators.

    python -m benchmarks profile SPEC [--batch B] [--precision fp32|bf16|bf16w] [--mode eager|compiled] [--reps N]
    python -m benchmarks profile cav-mae --reference CHECKOUT --timm DIR [...]   # the official CAV-MAE code too

One untimed step warms up (and compiles, for ``--mode compiled``: regional compilation as in training),
then ``reps`` steps (forward, backward, AdamW) run under torch.profiler. Each aten operator's own (self)
CPU time goes to one kind of work (`KINDS`): linear layers, attention (SDPA kernels, or the batched
products and softmax of an explicit attention), convolutions, the
optimizer, copies and casts, concatenation, norms, element-wise and the rest. Whatever the step's wall
time holds beyond the aten operators is "compiled kernels and Python": inductor's fused kernels (which
the profiler does not see as aten operators) plus interpreter overhead. With ``--reference`` the same
split is taken for the official CAV-MAE model (imported from the user's checkout, as in
`reference_cavmae`; eager, and with autocast for bf16 and bf16w) on the same inputs, and the two are
printed side by side.

Compiled layers are profiled with inductor's Python wrapper (`PYTHON_WRAPPER`): under the C++ wrapper
that training uses on a CPU (`avdsl.runtime.regional.CPU_OPTIONS`) the operators a compiled layer calls
(its matmuls, its attention) do not reach the profiler, and the split would show only "compiled kernels".
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.trial import random_batch

from .step import make_step
from .timing import cpu_features

# (kind, operator-name fragments); the first kind with a matching fragment takes an operator (`kind_of`)
KINDS = (
    ("linear layers (mm, addmm)", ("aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::linear")),
    ("attention (SDPA; bmm, softmax)", ("scaled_dot_product", "_flash_attention", "_efficient_attention",
                                        "aten::bmm", "aten::baddbmm", "aten::_softmax",
                                        "aten::_softmax_backward_data")),
    ("convolutions", ("convolution",)),
    ("optimizer (AdamW)", ("adam",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("concatenate / stack", ("aten::cat", "aten::stack")),
    ("norms", ("layer_norm", "batch_norm")),
    ("element-wise and the rest", ("",)),
)
MATRIX_KINDS = KINDS[0][0], KINDS[1][0], KINDS[2][0]
OUTSIDE = "compiled kernels and Python"
# compiled layers as inductor's Python wrapper runs them: their aten operators stay visible (see above)
PYTHON_WRAPPER = {"cpp_wrapper": False, "cpp_wrapper_build_separate": False}


def kind_of(op: str) -> str:
    """The kind of work of an aten operator's name (see `KINDS`): a fragment starting with ``aten::``
    names one operator exactly, any other fragment is looked for inside the name."""
    for kind, fragments in KINDS:
        if any(op == fragment if fragment.startswith("aten::") else fragment in op for fragment in fragments):
            return kind
    return KINDS[-1][0]


def profile_step(model: torch.nn.Module, batch_inputs: dict, precision: str, mode: str, reps: int) -> dict:
    """Profile ``reps`` training steps of ``model`` after one untimed step: wall time per step, aten
    operators per step, and the time per kind of work."""
    model = model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training loop
    torch.compiler.reset()
    step = make_step(model, optimizer, batch_inputs, precision, scope="regional" if mode == "compiled" else None,
                     inductor_options=PYTHON_WRAPPER)
    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    wall_ms = (time.perf_counter() - start) * 1e3 / reps
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    rows = sorted(({"op": e.key, "calls": e.count // reps, "self_ms": e.self_cpu_time_total / 1e3 / reps,
                    "kind": kind_of(e.key)} for e in events), key=lambda r: -r["self_ms"])
    kinds = {kind: 0.0 for kind, _ in KINDS}
    for row in rows:
        kinds[row["kind"]] += row["self_ms"]
    kinds[OUTSIDE] = max(0.0, wall_ms - sum(kinds.values()))
    return {"step_ms": wall_ms, "kinds": kinds, "rows": rows}


def run(spec: str, batch: int, precision: str, reps: int, mode: str = "eager", reference: str | None = None,
        timm_dir: str | None = None, top: int = 25) -> dict:
    """avdsl's step (and the reference's, with ``reference``) on the same random inputs."""
    torch.manual_seed(0)
    model = compile_graph(analyse(spec).graph)
    data = random_batch(model.inputs, batch)
    sides = {"avdsl": profile_step(model, data, precision, mode, reps)}
    del model
    if reference is not None:
        from .reference_cavmae import build_reference

        torch.manual_seed(0)
        own = "bf16" if precision == "bf16w" else precision  # the reference trains bf16 with autocast
        sides["reference"] = profile_step(build_reference(reference, timm_dir), data, own, "eager", reps)
    for side in sides.values():
        side["rows"] = side["rows"][:top]
    return {"spec": spec, "batch": batch, "precision": precision, "mode": mode, "reps": reps, "sides": sides,
            "cpu": cpu_features(), "threads": torch.get_num_threads()}


def render(result: dict) -> str:
    r, sides = result, result["sides"]
    names = list(sides)
    head = (f"{r['spec']} batch {r['batch']} {r['precision']} ({r['cpu']}, {r['threads']} threads); avdsl "
            f"{r['mode']}{', reference eager' if 'reference' in sides else ''}; ms per training step")
    lines = [head, f"{'kind of work':<34}" + "".join(f"{n + ' ms':>14}{'share':>7}" for n in names)]
    for kind in [k for k, _ in KINDS] + [OUTSIDE]:
        cells = "".join(f"{s['kinds'][kind]:>14.0f}{100 * s['kinds'][kind] / s['step_ms']:>6.0f}%"
                        for s in sides.values())
        lines.append(f"{kind:<34}{cells}")
    lines.append(f"{'step (wall time)':<34}" + "".join(f"{s['step_ms']:>14.0f}{'':>7}" for s in sides.values()))
    matrix = "".join(f"{sum(s['kinds'][k] for k in MATRIX_KINDS) / s['step_ms']:>20.0%} " for s in sides.values())
    lines.append(f"{'matrix work (first three kinds)':<34}{matrix}")
    for name, side in sides.items():
        lines += ["", f"{name}: top operators", f"{'operator':<58}{'calls':>7}{'self ms':>10}  kind"]
        lines += [f"{row['op'][:57]:<58}{row['calls']:>7}{row['self_ms']:>10.1f}  {row['kind']}" for row in side["rows"]]
    return "\n".join(lines)
