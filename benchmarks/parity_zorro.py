"""Zorro against the public PyTorch port, for `python -m benchmarks.parity zorro ...` (see `benchmarks.parity`).

    python -m benchmarks.parity zorro --reference PATH [--deps DIR] [--size paper|small]

PATH is the root of your checkout of lucidrains/zorro-pytorch (class ``Zorro`` in
``zorro_pytorch/zorro_pytorch.py``); DIR a folder with the port's imports that are not in avdsl's
environment (``pip install --target DIR einops beartype``; torchaudio is avdsl's own).

The spec is `zorro-port` (``specs/zorro-port.yaml``). The port computes a spectrogram from a waveform
inside its forward; the port runs on the waveform as it is, and avdsl gets the port's own
spectrogram of it (its ``spec`` module, cropped to whole patches as the port crops it), time first.
So the port patches frequency x time and avdsl time x frequency: the audio patch values and the
audio tokens are permuted accordingly (in the ported weights and in the compared tokens).

Weights: the port's random init, with every LayerNorm weight and bias and every linear bias made
random as well, ported by the format `avdsl import --from zorro-port` uses (the data file
runtime/formats/zorro-port.yaml). The port has no projectors or loss; the spec's three projectors
(``out_z[avf]``) are avdsl's own and not compared.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from avdsl.api import analyse_text
from avdsl.compiler import compile_graph

from .parity import Capture, default_dtype, import_package, port, relative, report, swap_order

# sizes the port is built at; the spec is `zorro-port` with the same sizes
PAPER = {"dim": 768, "depth": 12, "heads": 12, "dim_head": 64, "samples": 12288, "video": (8, 224)}
SMALL = {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "samples": 768, "video": (4, 32)}
N_FFT, PATCH = 128, 16  # the port's defaults: 65 frequency bins, cropped to 64; 16 x 16 patches


def spec_text(size: dict, frames: int) -> str:
    t, hw = size["video"]
    d = size["dim"]
    return f"""\
avdsl: 1
extends: zorro-port
inputs:
  fbank[B, {frames}, {N_FFT // 2 // PATCH * PATCH}]: fbank
  frames[B, 3, {t}, {hw}, {hw}]: video
encoders:
  backbone: {{width: {d}, depth: {size['depth']}, heads: {size['heads']}, mlp_dim: {int(d * 4 * 2 / 3)}}}
outputs:
  pooled: attnpool(global_out, global_out, backbone.fusion, queries=3, heads={size['heads']}, each=true, norm=true, residual=true, bias=false)
"""


def zorro(args) -> int:
    root = Path(args.reference) / "zorro_pytorch"
    if not (root / "zorro_pytorch.py").is_file():
        raise SystemExit(f"{root / 'zorro_pytorch.py'} not found: pass the root of a lucidrains/zorro-pytorch checkout")
    if args.deps:
        sys.path.insert(0, str(Path(args.deps).resolve()))
    sys.path.insert(0, str(Path(args.reference).resolve()))  # the package imports itself by its own name
    size = SMALL if args.size == "small" else PAPER
    package = import_package(root, "zorro_pytorch")
    torch.manual_seed(args.seed)
    ref = package.Zorro(dim=size["dim"], depth=size["depth"], heads=size["heads"], dim_head=size["dim_head"],
                        num_fusion_tokens=16, audio_patch_size=PATCH, video_patch_size=PATCH,
                        video_temporal_patch_size=2).eval()
    with torch.no_grad():  # random norms and biases too (the init leaves them at 1 and 0)
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))

    gen = torch.Generator().manual_seed(args.seed + 1)
    t, hw = size["video"]
    wave = torch.randn(args.batch, size["samples"], generator=gen).double()
    video = torch.randn(args.batch, 3, t, hw, hw, generator=gen).double()
    with torch.no_grad():
        spec = ref.spec.double()(wave)
    bins, frames = spec.shape[-2] // PATCH * PATCH, spec.shape[-1] // PATCH * PATCH
    fbank = spec[:, :bins, :frames].transpose(1, 2)  # the port's crop, time first
    tokens_t = swap_order(bins // PATCH, frames // PATCH)  # port audio tokens (frequency-major) -> avdsl's

    model = compile_graph(analyse_text(spec_text(size, frames), "<parity>", args.set).graph).eval()
    ported = port("zorro-port", model, ref.state_dict())
    model.load_state_dict(ported.state)
    n_audio, n_fusion = tokens_t.numel(), ref.fusion_tokens.shape[0]

    results: dict[str, dict] = {}
    for dtype in (torch.float64, torch.float32):
        ref.to(dtype)
        model.to(dtype)
        with default_dtype(dtype), torch.no_grad():
            hooks = Capture({"audio": ref.audio_to_tokens, "video": ref.video_to_tokens, "norm": ref.norm})
            with contextlib.redirect_stdout(sys.stderr):  # the port prints its spectrogram crop
                pooled = ref(audio=wave.to(dtype), video=video.to(dtype))
            hooks.close()
            ours = Capture({"audio": model.audio_tokenize, "video": model.video_tokenize, "backbone": model.backbone})
            out = model(fbank=fbank.to(dtype), frames=video.to(dtype))
            ours.close()
        h, o, b = hooks.out, out["outputs"], ours.out["backbone"]
        final = h["norm"]
        rows = {
            "tokenizer audio": relative(ours.out["audio"], h["audio"].flatten(1, 2)[:, tokens_t]),
            "tokenizer video": relative(ours.out["video"], h["video"].flatten(1, 3)),
            "tokens backbone.audio": relative(b["audio"], final[:, :n_audio][:, tokens_t]),
            "tokens backbone.fusion": relative(b["fusion"], final[:, n_audio:n_audio + n_fusion]),
            "tokens backbone.video": relative(b["video"], final[:, n_audio + n_fusion:]),
            "pooled (3 return tokens)": relative(o["pooled"], pooled),
            "audio_out": relative(o["audio_out"], pooled[:, 0]),
            "video_out": relative(o["video_out"], pooled[:, 1]),
            "fusion_out": relative(o["fusion_out"], pooled[:, 2]),
        }
        for key, value in rows.items():
            results.setdefault(key, {})[dtype] = value
    ours_count = sum(p.numel() for p in model.parameters())
    own = sum(p.numel() for n, p in model.named_parameters() if n.startswith("out_z"))
    theirs = sum(p.numel() for p in ref.parameters())
    print(f"Zorro (zorro-port, {args.size} size, batch {args.batch}) vs the port at {args.reference}: "
          f"max |avdsl - reference| / max |reference|")
    print(f"  ported {len(ported.state) - len(ported.own)} tensors; parameters: port {theirs:,}, "
          f"spec {ours_count:,} (= port + the paper's projectors {own:,})" + ("" if ours_count - own == theirs else "  MISMATCH"))
    return report(results) or int(ours_count - own != theirs)
