"""The paper-size CAV-MAE training step against the official reference code, side by side.

    python -m benchmarks reference-cavmae --reference CHECKOUT [--timm DIR] [--batch 4] [--reps 3]

CHECKOUT is the user's own clone of the official code (github.com/YuanGongND/cav-mae); its
``src/models/cav_mae.py`` is imported at run time, nothing of it lives in this project. It needs timm
0.4.5, which is best kept out of the environment: ``pip install --target DIR timm==0.4.5 --no-deps``
and pass ``--timm DIR``. Two shims are applied before importing it, in the child process only: numpy's
removed ``np.float`` is set to ``float``, and when torchvision is not installed an empty stand-in
module is registered (timm 0.4.5 imports it for its data transforms, which the model never uses).

The reference model is ``CAVMAE(norm_pix_loss=True)`` called as ``model(audio, imgs, 0.75, 0.75, 1.0,
0.01)`` (its defaults for pretraining); avdsl runs ``specs/cav-mae.yaml``. Both get the same random
inputs and train with the same optimizer, torch's fused AdamW (what ``avdsl train`` uses), so the
ratios compare the models (forward, backward, step). Every configuration runs in a fresh process, so
the peak memory (max RSS on the CPU, max allocated on CUDA) is that configuration's alone. FLOP/s use
avdsl's cost pass for both (3 x forward FLOPs x batch), so the ratios are the step-time ratios.
"""
from __future__ import annotations

import contextlib
import io
import sys
import types
from pathlib import Path

import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.trial import random_batch

from .step import make_step, time_steps
from .timing import ChildFailed, machine_peaks, peak_memory_bytes, peak_tflops, run_child

SPEC = "cav-mae"
# (who, mode, precision): the rows of the table, in order; the first is the reference of the ratios
CONFIGS = (("reference", "eager", "bf16"), ("avdsl", "eager", "bf16"), ("avdsl", "compiled", "bf16"),
           ("reference", "eager", "fp32"), ("avdsl", "eager", "fp32"), ("avdsl", "compiled", "fp32"),
           ("avdsl", "eager", "bf16w"), ("avdsl", "compiled", "bf16w"))  # bf16 weights, fp32 masters


def _stand_in(name: str) -> types.ModuleType:
    """An empty module whose every attribute is another empty module (imports succeed, nothing runs)."""
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that ``import name.sub`` works

    def attribute(attr: str):
        if attr.startswith("__"):  # keep inspect and importlib away from the stand-ins
            raise AttributeError(attr)
        return _stand_in(f"{name}.{attr}")

    module.__getattr__ = attribute
    return module


def load_reference(checkout: str, timm_dir: str | None) -> type:
    """The reference ``CAVMAE`` class, imported from the user's checkout (with the shims above)."""
    import numpy as np

    models = Path(checkout) / "src" / "models" / "cav_mae.py"
    if not models.is_file():
        raise FileNotFoundError(f"{checkout} does not look like a cav-mae checkout (no src/models/cav_mae.py)")
    if timm_dir:
        sys.path.insert(0, str(Path(timm_dir).resolve()))
    sys.path.insert(0, str((Path(checkout) / "src").resolve()))
    if not hasattr(np, "float"):
        np.float = float  # removed from numpy 1.24; the reference's sin-cos tables still use it
    try:
        import torchvision  # noqa: F401
    except ImportError:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = _stand_in(name)
    import timm

    if not timm.__version__.startswith("0.4."):
        raise RuntimeError(f"the reference needs timm 0.4.5, found {timm.__version__}; pass --timm DIR")
    from models.cav_mae import CAVMAE

    return CAVMAE


class _Reference(torch.nn.Module):
    """The reference model called with avdsl's input names, returning {"loss"} like avdsl models."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fbank, frame):
        return {"loss": self.model(fbank, frame, 0.75, 0.75, 1.0, 0.01)[0]}


def build_reference(checkout: str, timm_dir: str | None) -> torch.nn.Module:
    """The official pretraining model, ``CAVMAE(norm_pix_loss=True)``, called with avdsl's input names."""
    cavmae = load_reference(checkout, timm_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
        return _Reference(cavmae(norm_pix_loss=True))


def once(who: str, mode: str, precision: str, batch: int, reps: int, checkout: str, timm_dir: str | None,
         device: str = "cpu") -> dict:
    """Build one model, run one untimed step (the compile, for `compiled`), then ``reps`` timed steps."""
    device = torch.device(device)
    torch.manual_seed(0)
    avdsl = compile_graph(analyse(SPEC).graph)
    data = random_batch(avdsl.inputs, batch, device=device)
    if who == "reference":
        model = build_reference(checkout, timm_dir)
        del avdsl
    else:
        model = avdsl
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same for both sides
    step = make_step(model, optimizer, data, precision, device.type, "regional" if mode == "compiled" else None)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return {**time_steps(step, reps, sync), "peak_memory_gb": peak_memory_bytes(device) / 1e9}


def _subprocess(config: tuple, batch: int, reps: int, checkout: str, timm_dir: str | None, device: str) -> dict:
    who, mode, precision = config
    args = ["reference-cavmae-once", who, mode, precision, "--batch", str(batch), "--reps", str(reps),
            "--reference", checkout, "--device", device]
    if timm_dir:
        args += ["--timm", timm_dir]
    try:
        return run_child(args)
    except ChildFailed as failed:
        return {"failed": str(failed)[:200]}


def run(checkout: str, timm_dir: str | None, batch: int, reps: int, device: str = "cpu") -> dict:
    load_reference(checkout, timm_dir)  # a wrong path or timm fails here, before any timing
    flops = 3 * analyse(SPEC).cost.total_flops * batch
    peaks = machine_peaks()
    rows = []
    for config in CONFIGS:
        row = dict(zip(("who", "mode", "precision"), config), **_subprocess(config, batch, reps, checkout, timm_dir, device))
        if "step_s" in row:
            row["tflops"] = flops / row["step_s"] / 1e12
            row["of_peak"] = row["tflops"] / peak_tflops(peaks, row["precision"])
        rows.append(row)
    base = rows[0].get("step_s")
    for row in rows:
        if base and "step_s" in row:
            row["vs_reference_bf16"] = base / row["step_s"]
    ref_fp32 = next((r.get("step_s") for r in rows if r["who"] == "reference" and r["precision"] == "fp32"), None)
    for row in rows:
        if ref_fp32 and row["precision"] == "fp32" and "step_s" in row:
            row["vs_reference_fp32"] = ref_fp32 / row["step_s"]
    return {"spec": SPEC, "batch": batch, "reps": reps, "device": device, "step_flops": flops, "peaks": peaks,
            "threads": torch.get_num_threads(), "rows": rows}


def render(result: dict) -> str:
    p = result["peaks"]
    lines = [f"CPU capability: {p['cpu']} ({'AMX: bf16 matmuls native' if 'amx' in p['cpu'] else 'no AMX: bf16 matmuls slow or emulated'}), "
             f"{result['threads']} threads; matmul peak fp32 {p['fp32_tflops']:.3f}, bf16 {p['bf16_tflops']:.3f} TFLOP/s",
             f"CAV-MAE paper size, batch {result['batch']}, training step (forward, backward, AdamW), "
             f"{result['step_flops'] / 1e12:.2f} TFLOP per step, best of {result['reps']}",
             f"{'':<10}{'mode':<10}{'prec':<6}{'step s':>8}{'TFLOP/s':>9}{'of peak':>9}{'vs ref bf16':>13}"
             f"{'vs ref fp32':>13}{'peak GB':>9}{'loss':>9}"]
    for r in result["rows"]:
        head = f"{r['who']:<10}{r['mode']:<10}{r['precision']:<6}"
        if "step_s" not in r:
            lines.append(f"{head}  failed: {r.get('failed')}")
            continue
        ratio = lambda k: f"{r[k]:.2f}x" if k in r else ""
        lines.append(f"{head}{r['step_s']:>8.2f}{r['tflops']:>9.3f}{100 * r['of_peak']:>8.0f}%{ratio('vs_reference_bf16'):>13}"
                     f"{ratio('vs_reference_fp32'):>13}{r['peak_memory_gb']:>9.2f}{r['loss']:>9.4f}")
    return "\n".join(lines)
