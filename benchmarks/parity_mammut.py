"""MaMMUT parity: the `mammut-openclip` spec against open_clip's `MaMMUT`, on your own checkout.

    python -m benchmarks.parity mammut --reference PATH [--config B-32|L-14] [--size paper|small] [--batch 2]

PATH is the root of an open_clip checkout that has ``src/open_clip/mammut_model.py`` (the MaMMUT
branch). Only the model modules are imported, from PATH, at run time (nothing of them is copied into
avdsl): the package's ``__init__`` is not run, so its tokenizer and training dependencies are not
needed, and a stand-in for ``torchvision.ops.misc`` is provided when torchvision is not installed
(open_clip's utilities import one class from it that the model never uses).

``--config`` picks the structure of one of the released configs, built at the chosen size:
``B-32`` (``mammut_ViT-B-32.json``: ``has_mlp: false``, so a decoder layer with cross-attention runs
its MLP only after cross-attention; mean pooling with the final LayerNorm after pooling; the
decoder cross-attends to the unnormalised image tokens, CLS included) is exactly the shipped
``mammut-openclip`` spec; ``L-14`` (``mammut_ViT-L-14.json``: an MLP in every self-attention block
and another in every cross-attention block; CLS pooling after the final LayerNorm; the decoder reads
the normalised patch tokens without CLS) is that spec with ``cross_mlp: own`` and those outputs.
``--size paper`` is ViT-B/16 at 224 pixels with a 768-wide, 12-layer decoder (the paper's size),
``small`` a 2-layer ViT on 32 x 32 images and a 4-layer, 64-wide decoder with 16-token captions.

Random weights everywhere (the reference's init; norms, biases and the logit scale shifted; the
zero-initialised vocabulary projection drawn), ported by the format `avdsl import` uses (the data
files runtime/formats/mammut-openclip.yaml for B-32, mammut-openclip-l14.yaml for L-14; the patch
bias open_clip has not is zero); both models run the same images and captions (with trailing padding) in float64 and float32. Compared: the image tokens, the image
tokens mapped for the decoder, each decoder pass's text tokens, both embeddings, the logits and the
losses (open_clip's `CoCaLoss` with weights 1, its learned logit scale ported to the spec's
``learn_tau=true`` temperature).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from avdsl.api import analyse_text
from avdsl.compiler import compile_graph

from .parity import Capture, default_dtype, port, relative, report

# ------------------------------------------------------------------------------ sizes and specs

SIZES = {
    "paper": {"image": 224, "patch": 16, "vision_width": 768, "vision_layers": 12, "head_width": 64,
              "width": 768, "heads": 12, "layers": 12, "context": 77, "embed": 768},
    "small": {"image": 32, "patch": 8, "vision_width": 64, "vision_layers": 2, "head_width": 16,
              "width": 64, "heads": 4, "layers": 4, "context": 16, "embed": 64},
}
VOCAB = 49408  # open_clip's MultimodalTransformer builds its token table at this size whatever the config says

# the structure of each released config, on top of `mammut-openclip` (which is B-32's)
CONFIGS = {
    "B-32": {"vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True}, "text_cfg": {"has_mlp": False},
             "final_norm": "false", "cross_mlp": "with_cross", "memory": "vision.image",
             "pooled": "layernorm(mean(vision.image))", "tokens": lambda x: x, "format": "mammut-openclip"},
    "L-14": {"vision_cfg": {}, "text_cfg": {},
             "final_norm": "true", "cross_mlp": "own", "memory": "tokens(vision.image, skip=1)",
             "pooled": "first(vision.image)", "tokens": lambda x: x[:, 1:], "format": "mammut-openclip-l14"},
}

SPEC = """\
avdsl: 1
extends: mammut-openclip
name: mammut-openclip-parity
vars: {context: CONTEXT}
inputs:
  pixels[B, 3, IMAGE, IMAGE]: image
streams:
  image: {tokenizer: "patch2d(PATCH, PATCH)"}
encoders:
  vision: {width: VWIDTH, depth: VLAYERS, heads: VHEADS, final_norm: FINAL}
  decoder:
    width: WIDTH
    depth: LAYERS
    heads: HEADS
    cross_mlp: CROSS_MLP
    memory:
      image_tokens: linear(MEMORY, WIDTH, bias=false)
outputs:
  image_embedding: linear(POOLED, EMBED, bias=false)
"""


def spec_text(size: dict, config: dict) -> str:
    """The spec compared at one size and config (placeholders are whole words of the text above); at
    the paper size with the B-32 structure, the shipped `mammut-openclip` spec as it is."""
    if size is SIZES["paper"] and config is CONFIGS["B-32"]:
        return "avdsl: 1\nextends: mammut-openclip\n"
    values = {"CONTEXT": size["context"], "IMAGE": size["image"], "PATCH": size["patch"], "VWIDTH": size["vision_width"],
              "VLAYERS": size["vision_layers"], "VHEADS": size["vision_width"] // size["head_width"],
              "FINAL": config["final_norm"], "WIDTH": size["width"], "LAYERS": size["layers"], "HEADS": size["heads"],
              "CROSS_MLP": config["cross_mlp"], "MEMORY": config["memory"], "POOLED": config["pooled"],
              "EMBED": size["embed"]}
    text = SPEC
    for key, value in values.items():
        text = re.sub(rf"\b{key}\b", lambda _m, v=value: str(v), text)
    return text


# ------------------------------------------------------------------------------ the reference


def import_open_clip(root: Path):
    """open_clip's model modules from ``root/src/open_clip``, without running the package's ``__init__``."""
    folder = root / "src" / "open_clip"
    if not (folder / "mammut_model.py").is_file():
        raise SystemExit(f"{folder / 'mammut_model.py'} not found: pass the root of an open_clip checkout with MaMMUT")
    if importlib.util.find_spec("torchvision") is None:  # utils.py imports FrozenBatchNorm2d, unused by MaMMUT
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
        for name in ("torchvision", "torchvision.ops"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision.ops.misc"] = misc
    package = types.ModuleType("open_clip")  # modified_resnet.py imports `open_clip.utils` by that name
    package.__path__ = [str(folder)]
    sys.modules["open_clip"] = package
    return importlib.import_module("open_clip.mammut_model"), importlib.import_module("open_clip.loss")


def build_reference(mammut_model, size: dict, config: dict):
    vision_cfg = {"image_size": size["image"], "patch_size": size["patch"], "width": size["vision_width"],
                  "layers": size["vision_layers"], "head_width": size["head_width"], "output_tokens": True,
                  **config["vision_cfg"]}
    text_cfg = {"context_length": size["context"], "vocab_size": VOCAB, "width": size["width"], "heads": size["heads"],
                "layers": size["layers"], "output_tokens": True, "cross_attn_ratio": 2, "does_full_decoding": True,
                **config["text_cfg"]}
    return mammut_model.MaMMUT(embed_dim=size["embed"], text_cfg=text_cfg, vision_cfg=vision_cfg)


def randomise(ref) -> None:
    """Random norms and biases (the init leaves them at 1 and 0), a random vocabulary projection
    (initialised to zeros) and a logit scale moved off its initial log(1 / 0.07)."""
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn_like(p))
            elif not p.any():
                p.normal_(std=0.02)


def captions(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random token ids with trailing padding (id 0) of random length, at least two real tokens."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    for row in range(batch):
        real = int(torch.randint(2, length + 1, (1,), generator=gen))
        ids[row, real:] = 0
    return ids


def compare(ref, loss_module, model, config: dict, images: torch.Tensor, text: torch.Tensor) -> dict:
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints the caption's shape
        out = ref(images, text)
    image_latent, image_embs = ref._encode_image(images)
    mapped = image_embs @ ref.map_viz2txt_kv
    _, contrastive_tokens = ref.text(text_embs=text, image_embs=None)
    _, generative_tokens = ref.text(text_embs=text[:, :-1], image_embs=mapped)
    clip_loss, caption_loss = loss_module.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])

    ours = Capture({"vision": model.vision, "memory": model.memory_decoder_image_tokens, "decoder": model.decoder})
    result = model(pixels=images, caption=text)
    ours.close()
    o, d = result["outputs"], ours.out["decoder"]
    return {
        "tokens vision.image": relative(config["tokens"](ours.out["vision"]["image"]), image_embs),
        "memory image_tokens (mapped)": relative(ours.out["memory"], mapped),
        "tokens decoder.contrastive.text": relative(d["contrastive.text"], contrastive_tokens),
        "tokens decoder.generative.text": relative(d["generative.text"][:, :-1], generative_tokens),
        "image_embedding (normalised)": relative(F.normalize(o["image_embedding"], dim=-1), out["image_features"]),
        "text_embedding (normalised)": relative(F.normalize(o["text_embedding"], dim=-1), out["text_features"]),
        "logits": relative(o["logits"][:, :-1], out["logits"]),
        "loss contrastive": relative(result["losses"]["contrastive"], clip_loss),
        "loss captioning": relative(result["losses"]["captioning"], caption_loss),
        "loss (total)": relative(result["loss"], clip_loss + caption_loss),
    }


def mammut(args) -> int:
    size, config = SIZES[args.size], CONFIGS[args.config]
    mammut_model, loss_module = import_open_clip(Path(args.reference))
    torch.manual_seed(args.seed)
    ref = build_reference(mammut_model, size, config).eval()
    randomise(ref)
    model = compile_graph(analyse_text(spec_text(size, config), "<parity>", args.set).graph).eval()
    ported = port(config["format"], model, ref.state_dict())
    model.load_state_dict(ported.state)

    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, 3, size["image"], size["image"], generator=gen, dtype=torch.float64)
    text = captions(args.batch, size["context"], gen)
    results: dict[str, dict] = {}
    for dtype in (torch.float64, torch.float32):
        ref.to(dtype)
        model.to(dtype)
        with default_dtype(dtype), torch.no_grad():
            rows = compare(ref, loss_module, model, config, images.to(dtype), text)
        for name, value in rows.items():
            results.setdefault(name, {})[dtype] = value
    print(f"MaMMUT (open_clip's structure of {args.config}, {args.size} size, batch {args.batch}) vs {args.reference}: "
          f"max |avdsl - reference| / max |reference|")
    print(f"  ported {len(ported.state) - len(ported.zeros)} tensors; zero: {', '.join(ported.zeros)} (open_clip has none)")
    return report(results)
