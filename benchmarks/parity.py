"""Numerical parity of a shipped spec with its paper's public reference code, on your own checkout.

    python -m benchmarks.parity cav-mae --reference PATH [--timm PATH] [--size paper|small] [--batch 2] [--set K=V]
    python -m benchmarks.parity cav-mae-ft --reference PATH [--timm PATH] ...
    python -m benchmarks.parity mbt-cls --reference PATH [--jax PATH] ...        (see `benchmarks.parity_mbt`)
    python -m benchmarks.parity zorro --reference PATH [--deps PATH] ...          (see `benchmarks.parity_zorro`)
    python -m benchmarks.parity mammut --reference PATH [--config B-32|L-14] ...  (see `benchmarks.parity_mammut`)

Imports the reference model from PATH at run time (nothing of it is copied into avdsl), gives it
random weights (norms and biases included), ports them into the avdsl model built from the spec
with the mapping `avdsl import` uses (the data files runtime/formats/*.yaml: cav-mae.yaml and
cav-mae-ft.yaml here), feeds both the same inputs and the same
masking noise, and prints the relative difference of every compared tensor in float64 and float32:
``max |avdsl - reference| / max |reference|``. Exit code 0 when every tensor is within the targets
(1e-12 in float64, 1e-5 in float32), 1 otherwise.

CAV-MAE (YuanGongND/cav-mae, class ``CAVMAE`` in ``src/models/cav_mae.py``) needs timm 0.4.5, which
recent Pythons cannot install next to a current timm: put it in a folder of its own
(``pip install --target DIR timm==0.4.5 --no-deps``) and pass ``--timm DIR``. The script also gives
NumPy back its removed ``np.float`` alias (the reference's sin-cos helper uses it) and, when
torchvision is not installed, an empty stand-in module (timm 0.4.5 imports its transforms, which the
model never uses).

What is compared, in avdsl's token order (the reference patches the fbank as frequency x time, avdsl
as time x frequency; the permutation is applied to the reference's tensors and to the masking
noise): the fixed sin-cos tables (not ported: each side builds its own), the masks, the tokens after
the modality-specific layers, the three joint passes, the decoder output, the embeddings, the
predictions and the losses.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from avdsl.api import analyse_text
from avdsl.compiler import compile_graph
from avdsl.runtime import porting
from avdsl.runtime.embeddings import given_noise

TARGETS = {torch.float64: 1e-12, torch.float32: 1e-5}

# ------------------------------------------------------------------------------ weight mappings
# The weights are ported by the formats of `avdsl import` (data: runtime/formats/cav-mae.yaml and
# cav-mae-ft.yaml, applied by avdsl.runtime.porting), so the parity check and the import are one mapping.

CAV_MAE_FT_SPEC = """\
avdsl: 1
name: cav-mae-ft
doc: CAV-MAE fine-tuning (the reference's CAVMAEFT, multimodal mode), for the parity check.
inputs:
  fbank[B, FRAMES, 128]: fbank
  frame[B, 3, IMG, IMG]: image
streams:
  audio:
    input: fbank
    tokenizer: patch2d(16, 16)
    position: sincos2d(first=rows)
    type_embedding: true
  video:
    input: frame
    tokenizer: patch2d(16, 16)
    position: sincos2d()
    type_embedding: true
  a: {from: unimodal.audio}
  v: {from: unimodal.video}
encoders:
  unimodal:
    streams: [audio, video]
    width: WIDTH
    depth: 11
    heads: HEADS
    norm_eps: 1e-5
    weights: per_stream
    final_norm: false
    routing: [audio <- audio, video <- video]
  joint:
    streams: [a, v]
    width: WIDTH
    depth: 1
    heads: HEADS
    norm_eps: 1e-5
    routing: ["a, v <- a, v"]
outputs:
  logits: linear(layernorm(mean(joint.a, joint.v)), 527)
"""


def ft_spec(frames: int, img: int, width: int, heads: int) -> str:
    """The fine-tuning spec at one size (the placeholders are whole words of the text above)."""
    text = CAV_MAE_FT_SPEC
    for key, value in (("FRAMES", frames), ("IMG", img), ("WIDTH", width), ("HEADS", heads)):
        text = re.sub(rf"\b{key}\b", str(value), text)
    return text


# the spec at a CPU-friendly size that the reference can also be built at (it fixes 16 x 16
# patches and 128 mel bins): 256 frames, a 64 x 64 frame, width 64, decoder 32 x 2 layers
SMALL = {"img_size": 64, "audio_length": 256, "embed_dim": 64, "num_heads": 4,
         "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4}
SMALL_SPEC = """\
avdsl: 1
extends: cav-mae
name: cav-mae-parity-small
inputs:
  fbank[B, 256, 128]: fbank
  frame[B, 3, 64, 64]: image
encoders:
  unimodal: {width: 64, heads: 4}
  joint: {width: 64, heads: 4}
  decoder: {width: 32, depth: 2, heads: 4}
"""
PAPER_SPEC = "avdsl: 1\nextends: cav-mae\n"


# ------------------------------------------------------------------------------ the reference


def reference_environment(timm: str | None) -> None:
    """What the 2023 reference code needs from a current Python: timm 0.4.5 first on the path,
    ``np.float``, and a torchvision stand-in when torchvision is absent (timm imports its transforms)."""
    import numpy as np

    if timm:
        sys.path.insert(0, str(Path(timm).resolve()))
    if not hasattr(np, "float"):
        np.float = float  # removed in NumPy 1.24; the reference's sin-cos helper uses it
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def import_package(root: Path, name: str):
    """Import the package in folder ``root`` under the name ``name`` (its relative imports work)."""
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None:
        raise SystemExit(f"{root} is not a Python package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ porting


def swap_order(rows: int, cols: int) -> torch.Tensor:
    """Index p with ``b[k] = a[p[k]]``: a row-major [rows, cols] grid ``a`` read as [cols, rows]."""
    return torch.arange(rows * cols).view(rows, cols).T.reshape(-1)


def port(format_name: str, model, reference_state: dict) -> porting.Ported:
    """avdsl state from the reference state by the import format ``format_name``; every avdsl tensor set
    once and every reference tensor used once (or known to be fixed or unused), or an error that lists
    what is missing or left over."""
    try:
        return porting.port(porting.load_format(format_name), reference_state, model.state_dict())
    except porting.PortError as e:
        raise SystemExit(f"port incomplete:\n{e}") from None


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    if ours.shape != theirs.shape:
        raise SystemExit(f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    scale = theirs.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((ours - theirs).abs().max() / scale)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class Capture:
    """Forward hooks that keep the outputs of named submodules for one call."""

    def __init__(self, modules: dict):
        self.out: dict = {}
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in modules.items()]

    def _keep(self, name):
        def hook(_module, _args, output):
            self.out[name] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------ CAV-MAE


@dataclass
class Case:
    """One reference model against one spec: how to build each, the tables, and what to compare."""

    title: str
    build_reference: object  # (module, sizes) -> reference model
    spec: str  # spec text at paper size; SMALL_TEXT replaces its sizes for --size small
    format: str  # the `avdsl import` format that ports the reference's weights
    compare: object  # (ref, model, audio, imgs, layout, seed) -> {tensor name: relative difference}
    small_spec: str = ""


@dataclass
class Layout:
    """How avdsl's token and value order differs from the reference's (the fbank's two axes)."""

    tokens_t: torch.Tensor  # reference audio tokens (frequency-major) -> avdsl's (time-major)
    values_t: torch.Tensor  # values within an audio patch (frequency, time) -> (time, frequency)
    transforms: dict


def layout_for(frames: int) -> Layout:
    tokens_t, values_t = swap_order(128 // 16, frames // 16), swap_order(16, 16)
    return Layout(tokens_t, values_t, {"tokens_t": lambda t: t[:, tokens_t].clone()})


def run_case(case: Case, args) -> int:
    reference_environment(args.timm)
    package = Path(args.reference) / "src" / "models"
    if not (package / "cav_mae.py").is_file():
        raise SystemExit(f"{package / 'cav_mae.py'} not found: pass the root of a YuanGongND/cav-mae checkout")
    sizes = SMALL if args.size == "small" else {}
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints its configuration
        ref_module = import_package(package, "cav_mae_reference")
        torch.manual_seed(args.seed)
        ref = case.build_reference(ref_module, sizes).eval()
    text = case.small_spec if args.size == "small" else case.spec
    model = compile_graph(analyse_text(text, "<parity>", args.set).graph).eval()

    # random weights everywhere: the reference's own random init for matrices and tokens, and random
    # norms and biases too (its init leaves them at 1 and 0, which would hide a swapped norm or bias)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    frames, img = sizes.get("audio_length", 1024), sizes.get("img_size", 224)
    layout = layout_for(frames)
    ported = port(case.format, model, ref.state_dict())
    model.load_state_dict(ported.state)

    gen = torch.Generator().manual_seed(args.seed + 1)
    audio = torch.randn(args.batch, frames, 128, generator=gen, dtype=torch.float64)
    imgs = torch.randn(args.batch, 3, img, img, generator=gen, dtype=torch.float64)
    results: dict[str, dict] = {}
    for dtype in (torch.float64, torch.float32):
        ref.to(dtype)
        model.to(dtype)
        with default_dtype(dtype), torch.no_grad():
            rows = case.compare(ref, model, audio.to(dtype), imgs.to(dtype), layout, args.seed)
        for name, value in rows.items():
            results.setdefault(name, {})[dtype] = value
    print(f"{case.title} ({args.size} size, batch {args.batch}) vs {args.reference}: "
          f"max |avdsl - reference| / max |reference|")
    print(f"  ported {len(ported.state) - len(ported.fixed)} tensors; {len(ported.unused)} reference "
          f"tensors are never read by this forward (per-modality LayerNorms the reference builds but does not use here)")
    return report(results)


def compare_cav_mae(ref, model, audio, imgs, layout: Layout, seed: int) -> dict:
    """Run both models on the same inputs and noise; the relative difference of every compared tensor."""
    tokens_t, values_t, transforms = layout.tokens_t, layout.values_t, layout.transforms
    n_a, n_v = tokens_t.numel(), ref.patch_embed_v.num_patches
    torch.manual_seed(seed)  # the reference draws its masking noise with torch.rand: audio, then video
    noise_a, noise_v = torch.rand(audio.shape[0], n_a), torch.rand(imgs.shape[0], n_v)

    hooks = Capture({"a": ref.blocks_a[-1], "v": ref.blocks_v[-1], "dec": ref.decoder_norm})
    torch.manual_seed(seed)
    x, mask_a, ids_a, mask_v, ids_v, ca, cv = ref.forward_encoder(audio, imgs, 0.75, 0.75)
    pred_a, pred_v = ref.forward_decoder(x, mask_a, ids_a, mask_v, ids_v)
    hooks.close()
    torch.manual_seed(seed)
    loss, loss_mae, _la, _lv, loss_c, *_ = ref(audio, imgs, 0.75, 0.75, 1.0, 0.01)

    ours = Capture({"uni": model.unimodal, "joint": model.joint, "dec": model.decoder})
    with given_noise(model, {"audio": noise_a[:, tokens_t], "video": noise_v}):
        out = model(fbank=audio, frame=imgs)
        # the masks, recomputed from the same noise the model used
        _, our_mask_a, _ = model.audio_mask(torch.zeros(audio.shape[0], n_a, 1, dtype=audio.dtype), noise=noise_a[:, tokens_t])
        _, our_mask_v, _ = model.video_mask(torch.zeros(imgs.shape[0], n_v, 1, dtype=imgs.dtype), noise=noise_v)
    ours.close()
    kept_a = ca.shape[1]
    dec = hooks.out["dec"]
    o, j, u, d = out["outputs"], ours.out["joint"], ours.out["uni"], ours.out["dec"]
    return {
        "table audio_position": relative(model.audio_position.pos, transforms["tokens_t"](ref.pos_embed_a)),
        "table video_position": relative(model.video_position.pos, ref.pos_embed_v),
        "table decoder_audio_position": relative(model.decoder_audio_position.pos, transforms["tokens_t"](ref.decoder_pos_embed_a)),
        "table decoder_video_position": relative(model.decoder_video_position.pos, ref.decoder_pos_embed_v),
        "mask audio": relative(our_mask_a, mask_a[:, tokens_t]),
        "mask video": relative(our_mask_v, mask_v),
        "tokens unimodal.audio": relative(u["audio"], hooks.out["a"]),
        "tokens unimodal.video": relative(u["video"], hooks.out["v"]),
        "tokens joint.audio.a": relative(j["audio.a"], ca),
        "tokens joint.video.v": relative(j["video.v"], cv),
        "tokens joint.av.a": relative(j["av.a"], x[:, :kept_a]),
        "tokens joint.av.v": relative(j["av.v"], x[:, kept_a:]),
        "tokens decoder.decoder_audio": relative(d["decoder_audio"], dec[:, :n_a][:, tokens_t]),
        "tokens decoder.decoder_video": relative(d["decoder_video"], dec[:, n_a:]),
        "audio_embedding": relative(o["audio_embedding"], ca.mean(dim=1)),
        "video_embedding": relative(o["video_embedding"], cv.mean(dim=1)),
        "audio_pred": relative(o["audio_pred"], pred_a[:, tokens_t][:, :, values_t]),
        "video_pred": relative(o["video_pred"], pred_v),
        "loss reconstruction": relative(out["losses"]["reconstruction"], loss_mae),
        "loss contrastive": relative(out["losses"]["contrastive"], loss_c),
        "loss (total)": relative(out["loss"], loss),
    }


def report(results: dict) -> int:
    width = max(len(n) for n in results)
    print(f"  {'tensor':<{width}}  {'float64':>9}  {'float32':>9}")
    failed = []
    for name, by_dtype in results.items():
        cells = []
        for dtype in (torch.float64, torch.float32):
            value = by_dtype[dtype]
            ok = value <= TARGETS[dtype]
            cells.append(f"{value:9.1e}" + (" " if ok else "!"))
            if not ok:
                failed.append(f"{name} ({str(dtype).removeprefix('torch.')})")
        print(f"  {name:<{width}}  {cells[0]} {cells[1]}")
    worst = {d: max(r[d] for r in results.values()) for d in (torch.float64, torch.float32)}
    print(f"  worst: float64 {worst[torch.float64]:.1e} (target {TARGETS[torch.float64]:.0e}), "
          f"float32 {worst[torch.float32]:.1e} (target {TARGETS[torch.float32]:.0e})")
    if failed:
        print("  over target (!): " + ", ".join(failed))
        return 1
    return 0


def compare_cav_mae_ft(ref, model, audio, imgs, layout: Layout, seed: int) -> dict:
    """CAVMAEFT's multimodal forward against the fine-tuning spec: tokens, joint output, logits."""
    tokens_t, transforms = layout.tokens_t, layout.transforms
    n_a = tokens_t.numel()
    hooks = Capture({"a": ref.blocks_a[-1], "v": ref.blocks_v[-1], "joint": ref.norm})
    logits = ref(audio, imgs, "multimodal")
    hooks.close()
    ours = Capture({"uni": model.unimodal, "joint": model.joint})
    out = model(fbank=audio, frame=imgs)
    ours.close()
    u, j, joint = ours.out["uni"], ours.out["joint"], hooks.out["joint"]
    return {
        "table audio_position": relative(model.audio_position.pos, transforms["tokens_t"](ref.pos_embed_a)),
        "table video_position": relative(model.video_position.pos, ref.pos_embed_v),
        "tokens unimodal.audio": relative(u["audio"], hooks.out["a"][:, tokens_t]),
        "tokens unimodal.video": relative(u["video"], hooks.out["v"]),
        "tokens joint.a": relative(j["a"], joint[:, :n_a][:, tokens_t]),
        "tokens joint.v": relative(j["v"], joint[:, n_a:]),
        "logits": relative(out["outputs"]["logits"], logits),
    }


CASES = {
    "cav-mae": Case("CAV-MAE pretraining (CAVMAE)",
                    lambda m, sizes: m.CAVMAE(norm_pix_loss=True, **sizes),
                    PAPER_SPEC, "cav-mae", compare_cav_mae, SMALL_SPEC),
    "cav-mae-ft": Case("CAV-MAE fine-tuning (CAVMAEFT, multimodal)",
                       lambda m, sizes: m.CAVMAEFT(label_dim=527, **{k: v for k, v in sizes.items()
                                                                        if not k.startswith("decoder")}),
                       ft_spec(1024, 224, 768, 12), "cav-mae-ft", compare_cav_mae_ft, ft_spec(SMALL["audio_length"], SMALL["img_size"], SMALL["embed_dim"],
                                                   SMALL["num_heads"])),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted([*CASES, "mbt-cls", "zorro", "mammut"]))
    parser.add_argument("--reference", required=True, help="root of your checkout of the reference repository")
    parser.add_argument("--timm", help="cav-mae: folder holding the timm version the reference needs (pip install --target)")
    parser.add_argument("--jax", help="mbt-cls: folder holding JAX, flax and scenic's other imports (pip install --target)")
    parser.add_argument("--deps", help="zorro: folder holding the port's imports einops and beartype (pip install --target)")
    parser.add_argument("--size", choices=["paper", "small"], default="paper",
                        help="paper: the shipped spec as it is; small: width 64 and short inputs, quick on a CPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the avdsl spec, as `avdsl build --set` (e.g. to see what a choice costs)")
    parser.add_argument("--config", choices=["B-32", "L-14"], default="B-32",
                        help="mammut: the structure of this released open_clip config (B-32: no MLP in the "
                             "self-attention blocks of cross layers, mean pooling; L-14: an MLP in both, CLS pooling)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 64:
        parser.error("--batch must be between 1 and 64")
    if args.model == "mammut":
        from .parity_mammut import mammut

        return mammut(args)
    if args.model == "mbt-cls":
        from .parity_mbt import mbt_cls

        return mbt_cls(args)
    if args.model == "zorro":
        from .parity_zorro import zorro

        return zorro(args)
    return run_case(CASES[args.model], args)


if __name__ == "__main__":
    sys.exit(main())
