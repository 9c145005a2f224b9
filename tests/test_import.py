"""`avdsl import`: reference checkpoints with each format's real tensor names and shapes (synthetic
values, tiny sizes) become avdsl checkpoints that `eval` and `train --init` accept; every tensor is
the source tensor after the documented transform; missing and left-over tensors and misfitting shapes
are listed; hostile files are refused. The formats are data (runtime/formats/*.yaml)."""
from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from avdsl import limits
from avdsl.runtime import porting

# CAV-MAE at a tiny size the reference can be built at (16 x 16 patches, 128 mel bins): 64 frames
# (4 time x 8 frequency patches), a 32 x 32 frame (4 patches), width 32, decoder 16
CAV_SPEC = """\
avdsl: 1
extends: cav-mae
name: cav-mae-import-test
inputs:
  fbank[B, 64, 128]: fbank
  frame[B, 3, 32, 32]: image
encoders:
  unimodal: {width: 32, heads: 2, depth: 2}
  joint: {width: 32, heads: 2}
  decoder: {width: 16, depth: 1, heads: 2}
"""
CAV_FT_SPEC = """\
avdsl: 1
name: cav-mae-ft-import-test
inputs:
  fbank[B, 64, 128]: fbank
  frame[B, 3, 32, 32]: image
streams:
  audio: {input: fbank, tokenizer: "patch2d(16, 16)", position: "sincos2d(first=rows)", type_embedding: true}
  video: {input: frame, tokenizer: "patch2d(16, 16)", position: "sincos2d()", type_embedding: true}
  a: {from: unimodal.audio}
  v: {from: unimodal.video}
encoders:
  unimodal:
    streams: [audio, video]
    width: 32
    depth: 2
    heads: 2
    norm_eps: 1e-5
    weights: per_stream
    final_norm: false
    routing: [audio <- audio, video <- video]
  joint:
    streams: [a, v]
    width: 32
    depth: 1
    heads: 2
    norm_eps: 1e-5
    routing: ["a, v <- a, v"]
outputs:
  logits: linear(layernorm(mean(joint.a, joint.v)), 5)
"""
MBT_SPEC = """\
avdsl: 1
extends: mbt-cls
vars: {fusion_layer: 1}
inputs:
  spec[B, 64, 32]: fbank
  frames[B, 3, 4, 32, 32]: video
  labels[B, 5]: multilabel(5)
encoders:
  mbt: {width: 32, depth: 2, heads: 2}
outputs:
  logits_audio: linear(first(mbt.audio), 5)
  logits_video: linear(first(mbt.video), 5, shared=logits_audio)
"""
# the Zorro port at a tiny size: a 32-frame x 64-bin spectrogram (2 x 4 patches), 2 x 32 x 32 video
# (4 tubelets), 4 fusion tokens, width 32, 2 layers, GEGLU inner width 48
ZORRO_SPEC = """\
avdsl: 1
extends: zorro-port
name: zorro-port-import-test
inputs:
  fbank[B, 32, 64]: fbank
  frames[B, 3, 2, 32, 32]: video
streams:
  fusion: {latent: 4}
encoders:
  backbone: {width: 32, depth: 2, heads: 2, mlp_dim: 48}
outputs:
  pooled: attnpool(global_out, global_out, backbone.fusion, queries=3, heads=2, each=true, norm=true, residual=true, bias=false)
"""
# open_clip's MaMMUT at a tiny size: 16 x 16 images in 8 x 8 patches (+ CLS), a 2-layer ViT of width 16,
# a 4-layer decoder of width 32 (cross-attention in layers 0 and 2), embeddings of 32, 259 ids, 8 tokens.
# B-32 structure (the shipped mammut-openclip); L-14: an MLP of its own in each cross-attention block,
# CLS pooling after the vision encoder's final LayerNorm, the decoder reading the patch tokens only.
MAMMUT_SPEC = """\
avdsl: 1
extends: mammut-openclip
name: mammut-import-test
vars: {vocab: 259, context: 8}   # the byte tokenizer's ids, which `eval` draws
inputs:
  pixels[B, 3, 16, 16]: image
streams:
  image: {tokenizer: "patch2d(8, 8)"}
encoders:
  vision: {width: 16, depth: 2, heads: 2}
  decoder:
    width: 32
    depth: 4
    heads: 2
    memory:
      image_tokens: linear(vision.image, 32, bias=false)
outputs:
  image_embedding: linear(layernorm(mean(vision.image)), 32, bias=false)
"""
MAMMUT_L14_SPEC = (MAMMUT_SPEC.replace("depth: 2, heads: 2}", "depth: 2, heads: 2, final_norm: true}")
                   .replace("    heads: 2\n", "    heads: 2\n    cross_mlp: own\n")
                   .replace("linear(layernorm(mean(vision.image)), 32", "linear(first(vision.image), 32")
                   .replace("linear(vision.image, 32", "linear(tokens(vision.image, skip=1), 32"))


def _vit_layer(prefix: str, d: int, per_modality_norms: bool = True) -> dict:
    """A timm Block of the reference (CAV-MAE's Block also builds norm1_a, norm1_v, norm2_a, norm2_v)."""
    shapes = {}
    for norm in ("norm1", "norm2") + (("norm1_a", "norm1_v", "norm2_a", "norm2_v") if per_modality_norms else ()):
        shapes[f"{prefix}.{norm}.weight"] = shapes[f"{prefix}.{norm}.bias"] = (d,)
    for name, (o, i) in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))):
        shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = (o, i), (o,)
    return shapes


def cav_mae_shapes(d=32, dd=16, uni=2, dec=1, n_a=32, n_v=4, ft_classes=None) -> dict:
    """The state dict names and shapes of CAVMAE (or CAVMAEFT with ``ft_classes``), as the reference builds them."""
    s = {"patch_embed_a.proj.weight": (d, 1, 16, 16), "patch_embed_a.proj.bias": (d,),
         "patch_embed_v.proj.weight": (d, 3, 16, 16), "patch_embed_v.proj.bias": (d,),
         "modality_a": (1, 1, d), "modality_v": (1, 1, d), "pos_embed_a": (1, n_a, d), "pos_embed_v": (1, n_v, d)}
    for i in range(uni):
        s |= _vit_layer(f"blocks_a.{i}", d) | _vit_layer(f"blocks_v.{i}", d)
    s |= _vit_layer("blocks_u.0", d)
    for norm in ("norm_a", "norm_v", "norm"):
        s[f"{norm}.weight"] = s[f"{norm}.bias"] = (d,)
    if ft_classes:
        s |= {"mlp_head.0.weight": (d,), "mlp_head.0.bias": (d,), "mlp_head.1.weight": (ft_classes, d),
              "mlp_head.1.bias": (ft_classes,)}
        return s
    s |= {"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
          "decoder_modality_a": (1, 1, dd), "decoder_modality_v": (1, 1, dd),
          "decoder_pos_embed_a": (1, n_a, dd), "decoder_pos_embed_v": (1, n_v, dd),
          "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
          "decoder_pred_a.weight": (256, dd), "decoder_pred_a.bias": (256,),
          "decoder_pred_v.weight": (768, dd), "decoder_pred_v.bias": (768,)}
    for i in range(dec):
        s |= _vit_layer(f"decoder_blocks.{i}", dd)
    return s


def mbt_shapes(d=32, heads=2, depth=2, classes=5, n_a=9, n_v=9, bottlenecks=5) -> dict:
    """scenic MBT's flattened parameter names and shapes (classifier: token, separate encoders)."""
    hd = d // heads
    s = {"embedding_spectrogram/kernel": (16, 16, 3, d), "embedding_spectrogram/bias": (d,),
         "embedding/kernel": (2, 16, 16, 3, d), "embedding/bias": (d,),
         "clsspectrogram": (1, 1, d), "cls": (1, 1, d), "bottleneck": (1, bottlenecks, d),
         "Transformer/posembed_input_spectrogram/pos_embedding": (1, n_a, d),
         "Transformer/posembed_input/pos_embedding": (1, n_v, d),
         "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
         "output_projection/kernel": (d, classes), "output_projection/bias": (classes,)}
    for i in range(depth):
        for suffix in ("_spectrogram", ""):
            b = f"Transformer/encoderblock_{i}{suffix}"
            for n in ("LayerNorm_0", "LayerNorm_1"):
                s[f"{b}/{n}/scale"] = s[f"{b}/{n}/bias"] = (d,)
            for n in ("query", "key", "value"):
                s[f"{b}/MultiHeadDotProductAttention_0/{n}/kernel"] = (d, heads, hd)
                s[f"{b}/MultiHeadDotProductAttention_0/{n}/bias"] = (heads, hd)
            s[f"{b}/MultiHeadDotProductAttention_0/out/kernel"] = (heads, hd, d)
            s[f"{b}/MultiHeadDotProductAttention_0/out/bias"] = (d,)
            s[f"{b}/MlpBlock_0/Dense_0/kernel"], s[f"{b}/MlpBlock_0/Dense_0/bias"] = (d, 4 * d), (4 * d,)
            s[f"{b}/MlpBlock_0/Dense_1/kernel"], s[f"{b}/MlpBlock_0/Dense_1/bias"] = (4 * d, d), (d,)
    return s


def zorro_port_shapes(width=32, depth=2, mlp=48, fusion=4, window=128) -> dict:
    """The names and shapes of the port's ``Zorro.state_dict()`` (lucidrains/zorro-pytorch): 16 x 16
    audio patches, 2 x 16 x 16 RGB tubelets, bias-free LayerNorms holding a zero ``beta`` buffer."""
    s = {"return_tokens": (3, width), "attn_pool.norm.gamma": (width,), "attn_pool.norm.beta": (width,),
         "attn_pool.to_q.weight": (width, width), "attn_pool.to_kv.weight": (2 * width, width),
         "attn_pool.to_out.weight": (width, width), "spec.window": (window,), "fusion_tokens": (fusion, width),
         "norm.gamma": (width,), "norm.beta": (width,)}
    for name, values in (("audio", 256), ("video", 3 * 2 * 256)):
        s |= {f"{name}_to_tokens.1.weight": (values,), f"{name}_to_tokens.1.bias": (values,),
              f"{name}_to_tokens.2.weight": (width, values), f"{name}_to_tokens.2.bias": (width,),
              f"{name}_to_tokens.3.weight": (width,), f"{name}_to_tokens.3.bias": (width,)}
    for i in range(depth):
        s |= {f"layers.{i}.0.norm.gamma": (width,), f"layers.{i}.0.norm.beta": (width,),
              f"layers.{i}.0.to_q.weight": (width, width), f"layers.{i}.0.to_kv.weight": (2 * width, width),
              f"layers.{i}.0.to_out.weight": (width, width), f"layers.{i}.1.0.gamma": (width,),
              f"layers.{i}.1.0.beta": (width,), f"layers.{i}.1.1.weight": (2 * mlp, width),
              f"layers.{i}.1.3.weight": (width, mlp)}
    return s


def mammut_openclip_shapes(has_mlp: bool, vw=16, vlayers=2, width=32, layers=4, embed=32, vocab=259, context=8,
                           grid=4, patch=8) -> dict:
    """The names and shapes of open_clip's ``MaMMUT.state_dict()`` (``has_mlp`` false: B-32's config,
    the decoder blocks before a cross-attention block without MLP; true: L-14's, open_clip's default)."""
    def block(prefix: str, d: int, mlp: bool = True, kv_norm: bool = False) -> dict:
        out = {f"{prefix}.ln_1.weight": (d,), f"{prefix}.ln_1.bias": (d,), f"{prefix}.attn.in_proj_weight": (3 * d, d),
               f"{prefix}.attn.in_proj_bias": (3 * d,), f"{prefix}.attn.out_proj.weight": (d, d),
               f"{prefix}.attn.out_proj.bias": (d,)}
        if kv_norm:
            out |= {f"{prefix}.ln_1_kv.weight": (d,), f"{prefix}.ln_1_kv.bias": (d,)}
        if mlp:
            out |= {f"{prefix}.ln_2.weight": (d,), f"{prefix}.ln_2.bias": (d,), f"{prefix}.mlp.c_fc.weight": (4 * d, d),
                    f"{prefix}.mlp.c_fc.bias": (4 * d,), f"{prefix}.mlp.c_proj.weight": (d, 4 * d),
                    f"{prefix}.mlp.c_proj.bias": (d,)}
        return out

    s = {"visual.conv1.weight": (vw, 3, patch, patch), "visual.class_embedding": (vw,),
         "visual.positional_embedding": (grid + 1, vw), "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
         "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,), "visual.proj": (vw, embed),
         "map_viz2txt_kv": (vw, width), "logit_scale": (), "text.token_embedding.weight": (vocab, width),
         "text.positional_embedding": (context, width), "text.ln_final.weight": (width,),
         "text.ln_final.bias": (width,), "text.text_projection": (width, vocab)}
    for i in range(vlayers):
        s |= block(f"visual.transformer.resblocks.{i}", vw)
    for i in range(layers):
        s |= block(f"text.resblocks.{i}", width, mlp=has_mlp or i % 2 == 1)
        if i % 2 == 0:
            s |= block(f"text.cross_attn.{i // 2}", width, kv_norm=True)
    return s


def _model(text: str, tmp_path):
    from avdsl.api import analyse_text
    from avdsl.compiler import compile_graph

    return compile_graph(analyse_text(text, str(tmp_path / "spec.yaml")).graph)


def _freq_major(table: torch.Tensor, time: int) -> torch.Tensor:
    """avdsl's audio position table (time-major, 8 frequency rows) in the reference's frequency-major order."""
    _, n, d = table.shape
    return table.view(1, time, n // time, d).transpose(1, 2).reshape(1, n, d)


def _cav_reference(tmp_path, ft: bool = False) -> dict:
    """Random tensors of the reference's names and shapes; the fixed sin-cos tables as the reference builds them."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=gen) for k, v in cav_mae_shapes(ft_classes=5 if ft else None).items()}
    model = _model(CAV_FT_SPEC if ft else CAV_SPEC, tmp_path)
    state["pos_embed_a"], state["pos_embed_v"] = _freq_major(model.audio_position.pos, 4), model.video_position.pos.clone()
    if not ft:
        state["decoder_pos_embed_a"] = _freq_major(model.decoder_audio_position.pos, 4)
        state["decoder_pos_embed_v"] = model.decoder_video_position.pos.clone()
    return state


# the documented meaning of each transform, written independently of the steps that implement it
MEANING = {
    "copy": lambda *ts: ts[0] if len(ts) == 1 else torch.cat(ts),  # one as it is; several concatenated (Q, then K and V)
    "kernel_t": lambda t: t.transpose(-1, -2),  # Conv2d kernel, frequency x time -> time x frequency
    "values_t": lambda t: t.view(16, 16, *t.shape[1:]).transpose(0, 1).reshape(t.shape),  # patch values f*16+t -> t*16+f
    "dense": lambda k: k.T,
    "conv2d": lambda k: k.permute(3, 2, 0, 1),
    "conv3d": lambda k: k.permute(4, 3, 0, 1, 2),
    "heads_in": lambda *ks: torch.cat([k.reshape(k.shape[0], -1).T for k in ks]),
    "heads_bias": lambda *bs: torch.cat([b.reshape(-1) for b in bs]),
    "heads_out": lambda k: k.reshape(-1, k.shape[-1]).T,
    # Zorro port: a Linear over (frequency, time) patch values -> a [width, 1, time, frequency] kernel
    "audio_kernel": lambda w: w.view(-1, 16, 16).transpose(1, 2).reshape(-1, 1, 16, 16),
    "video_kernel": lambda w: w.view(-1, 3, 2, 16, 16),  # (channel, t, h, w) values -> a tubelet kernel
    "batch1": lambda t: t[None],
    "gate_first": lambda w: torch.cat([w[len(w) // 2:], w[:len(w) // 2]]),  # (value, gate) -> (gate, value)
    # open_clip
    "t": lambda w: w.T,  # applied as x @ W
    "token": lambda t: t.view(1, 1, -1),
    "table": lambda t: t[None],
    "q_rows": lambda w: w[:len(w) // 3],  # a packed in-projection's query rows
    "kv_rows": lambda w: w[len(w) // 3:],  # and its key and value rows
}


def _check_every_tensor(fmt_name: str, reference: dict, run, model_state: dict) -> None:
    written = load_file(str(next(run.glob("step-*")) / "model.safetensors"))
    assert set(written) == set(model_state)
    fmt = porting.load_format(fmt_name)
    rows = porting.expand(fmt.tensors, list(model_state))
    own, zeros = ({n for n in written if any(re.fullmatch(p, n) for p in patterns)} for patterns in (fmt.own, fmt.zeros))
    assert not (own | zeros) & {r.to for r in rows}
    assert {r.to for r in rows} | {r.to for r in fmt.fixed} | own | zeros == set(written)
    assert all(not written[n].any() for n in zeros)
    for row in rows:
        expected = MEANING[row.how](*(reference[s] for s in row.sources))
        assert torch.equal(written[row.to], expected), row.to
    for row in fmt.fixed:  # the spec's own table, equal to the reference's in the reference's order
        ours = written[row.to]
        assert torch.equal(_freq_major(ours, 4) if row.how == "tokens_t" else ours, reference[row.sources[0]])


@pytest.mark.parametrize("ft", [False, True], ids=["cav-mae", "cav-mae-ft"])
def test_cav_mae_checkpoint_imports_and_evaluates(run_cli, tmp_path, ft):
    spec = tmp_path / "spec.yaml"
    spec.write_text(CAV_FT_SPEC if ft else CAV_SPEC)
    reference = _cav_reference(tmp_path, ft)
    source = tmp_path / "ref.pth"
    torch.save({f"module.{k}": v for k, v in reference.items()}, source)  # as DataParallel saves it
    run = tmp_path / "imported"
    fmt = "cav-mae-ft" if ft else "cav-mae"
    code, out, err = run_cli("import", *[str(spec), str(source), "--from", fmt, "-o", str(run), "--json"])
    assert code == 0, out + err
    report = json.loads(out)
    unused = 2 * 2 * 4 * 2 + 2 * 4 if not ft else 2 * 2 * 4 * 2 + 2 * 4 + 4  # per-modality norms never read
    assert len(report["unused"]) == unused and report["tensors"] + len(report["fixed"]) + unused == len(reference)
    _check_every_tensor(fmt, reference, run, _model(spec.read_text(), tmp_path).state_dict())

    code, out, err = run_cli(*["eval", str(run), "--batches", "1", "--batch-size", "2", "--json"])
    assert code == 0, out + err
    assert json.loads(out)["checkpoint"].endswith("step-000000")


def test_mbt_npz_imports_and_trains_from_it(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MBT_SPEC)
    gen = np.random.default_rng(0)
    reference = {k: gen.standard_normal(v).astype(np.float32) for k, v in mbt_shapes().items()}
    source = tmp_path / "mbt.npz"
    np.savez(source, **{f"params/{k}": v for k, v in reference.items()})
    run = tmp_path / "imported"
    code, out, err = run_cli("import", *[str(spec), str(source), "--from", "mbt", "-o", str(run)])
    assert code == 0, out + err
    assert "imported 61 tensors" in (out + err)
    _check_every_tensor("mbt", {k: torch.from_numpy(v) for k, v in reference.items()}, run,
                        _model(MBT_SPEC, tmp_path).state_dict())
    # the fused projection computes what scenic's separate einsums compute
    written = load_file(str(run / "step-000000" / "model.safetensors"))
    x = torch.randn(3, 32)
    b = "Transformer/encoderblock_0_spectrogram/MultiHeadDotProductAttention_0"
    q, k, v = (torch.einsum("nd,dhk->nhk", x, torch.from_numpy(reference[f"{b}/{n}/kernel"])).reshape(3, 32)
               for n in ("query", "key", "value"))
    assert torch.allclose(x @ written["mbt.blocks.audio.0.qkv.weight"].T, torch.cat([q, k, v], dim=1), atol=1e-5)

    small = ["--steps", "1", "--batch-size", "2", "--train-size", "4", "--val-size", "2", "--json"]
    code, out, err = run_cli("train", str(spec), "--init", str(run), "--run-dir", str(tmp_path / "run"), *small)
    assert code == 0, out + err
    code, out, err = run_cli("train", str(spec), "--run-dir", str(run), "--resume", *small)  # continue in the import's run
    assert code == 0, out + err
    assert "resuming from" in err and (run / "step-000001").is_dir()
    code, out, err = run_cli("export", str(run / "step-000000"), "-o", str(tmp_path / "model.pt2"))
    assert code == 0, out + err


def _zorro_reference() -> dict:
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=gen) for k, v in zorro_port_shapes().items()}
    for name in state:
        if name.endswith(".beta"):
            state[name] = torch.zeros_like(state[name])  # the buffers of the port's bias-free LayerNorms
    return state


def test_zorro_port_checkpoint_imports_and_evaluates(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(ZORRO_SPEC)
    reference = _zorro_reference()
    source = tmp_path / "zorro.pt"
    torch.save(reference, source)
    run = tmp_path / "imported"
    code, out, err = run_cli("import", *[str(spec), str(source), "--from", "zorro-port", "-o", str(run), "--json"])
    assert code == 0, out + err
    report = json.loads(out)
    betas = 2 * 2 + 2  # each layer's two LayerNorms, the final one and the pool's
    assert sorted(report["unused"]) == sorted([k for k in reference if k.endswith(".beta")] + ["spec.window"])
    assert len(report["unused"]) == betas + 1 and report["fixed"] == []
    assert report["own"] == [f"out_z{m}.{w}" for m in "afv" for w in ("bias", "weight")]
    assert report["tensors"] + len(report["unused"]) + 3 == len(reference)  # to_q + to_kv -> one: 2 layers, the pool
    _check_every_tensor("zorro-port", reference, run, _model(ZORRO_SPEC, tmp_path).state_dict())
    written = load_file(str(run / "step-000000" / "model.safetensors"))
    # the port's GEGLU, value * gelu(gate), is avdsl's gelu(first half) * second half after the transform
    x = torch.randn(3, 32)
    value, gate = (x @ reference["layers.0.1.1.weight"].T).chunk(2, dim=-1)
    first, second = (x @ written["backbone.blocks.shared.0.fc1.weight"].T).chunk(2, dim=-1)
    assert torch.allclose(torch.nn.functional.gelu(first) * second, value * torch.nn.functional.gelu(gate))
    # the port's audio Linear over a patch's (frequency, time) values is avdsl's kernel over (time, frequency)
    patch = torch.randn(16, 16)  # [time, frequency], as avdsl reads the spectrogram
    ours = (written["audio_tokenize.proj.weight"][:, 0] * patch).sum(dim=(1, 2))
    assert torch.allclose(ours, reference["audio_to_tokens.2.weight"] @ patch.T.reshape(-1), atol=1e-5)

    code, out, err = run_cli(*["eval", str(run), "--batches", "1", "--batch-size", "2", "--json"])
    assert code == 0, out + err


def test_zorro_port_lists_missing_and_left_over_tensors(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(ZORRO_SPEC)
    reference = _zorro_reference()
    del reference["layers.1.0.to_kv.weight"]
    reference["layers.0.1.2.weight"] = torch.zeros(3)  # the GEGLU has no weights: not a tensor of the port
    reference |= {k.replace("layers.1.", "layers.2."): v for k, v in reference.items() if k.startswith("layers.1.")}
    torch.save(reference, tmp_path / "zorro.pt")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "zorro.pt"), "--from", "zorro-port",
                                         "-o", str(tmp_path / "o"), "--json"])
    assert code == 2
    error = json.loads(out)["error"]
    assert error["missing"] == ["layers.1.0.to_kv.weight (checkpoint, for backbone.blocks.shared.1.qkv.weight)"]
    third = {k for k in reference if k.startswith("layers.2.") and not k.endswith(".beta")}
    assert set(error["left_over"]) == third | {"layers.0.1.2.weight"}  # a third layer the spec does not have


def _mammut_reference(has_mlp: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=gen) for k, v in mammut_openclip_shapes(has_mlp).items()}


@pytest.mark.parametrize("fmt, has_mlp", [("mammut-openclip", False), ("mammut-openclip-l14", True)])
def test_open_clip_mammut_checkpoint_imports_and_evaluates(run_cli, tmp_path, fmt, has_mlp):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MAMMUT_L14_SPEC if has_mlp else MAMMUT_SPEC)
    reference = _mammut_reference(has_mlp)
    source = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.items()}}, source)  # open_clip's
    run = tmp_path / "imported"
    code, out, err = run_cli("import", *[str(spec), str(source), "--from", fmt, "-o", str(run), "--json"])
    assert code == 0, out + err
    report = json.loads(out)
    assert report["zeros"] == ["image_tokenize.proj.bias"] and report["unused"] == report["own"] == []
    # every tensor used once; the two cross-attention in-projections (weight, bias) each feed two rows
    assert report["tensors"] == len(reference) + 2 * 2
    _check_every_tensor(fmt, reference, run, _model(spec.read_text(), tmp_path).state_dict())
    written = load_file(str(run / "step-000000" / "model.safetensors"))
    # the cross-attention of text.cross_attn.1 is decoder layer 2; its MLP is the layer's (B-32) or its own (L-14)
    assert torch.equal(written["decoder.blocks.shared.2.norm_memory.all.weight"], reference["text.cross_attn.1.ln_1_kv.weight"])
    mlp = "cross_fc1" if has_mlp else "fc1"
    assert torch.equal(written[f"decoder.blocks.shared.2.{mlp}.weight"], reference["text.cross_attn.1.mlp.c_fc.weight"])

    code, out, err = run_cli(*["eval", str(run), "--batches", "1", "--batch-size", "2", "--json"])
    assert code == 0, out + err


def test_a_mammut_checkpoint_of_the_other_structure_is_listed(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MAMMUT_SPEC)
    torch.save(_mammut_reference(has_mlp=True), tmp_path / "l14.pt")  # L-14 weights into the B-32 structure
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "l14.pt"), "--from", "mammut-openclip",
                                         "-o", str(tmp_path / "o"), "--json"])
    assert code == 2
    error = json.loads(out)["error"]
    assert error["missing"] == [] and error["shapes"] == []
    # the MLPs of the layers with cross-attention and the final LayerNorm before pooling have no place
    assert error["left_over"] == sorted(f"text.resblocks.{i}.{n}.{w}" for i in (0, 2) for n in ("ln_2", "mlp.c_fc", "mlp.c_proj")
                                        for w in ("weight", "bias"))


def test_init_refuses_a_checkpoint_of_another_model(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MBT_SPEC)
    reference = {k: np.zeros(v, np.float32) for k, v in mbt_shapes().items()}
    np.savez(tmp_path / "mbt.npz", **reference)
    assert run_cli("import", *[str(spec), str(tmp_path / "mbt.npz"), "--from", "mbt", "-o", str(tmp_path / "imp")])[0] == 0
    other = tmp_path / "other.yaml"
    other.write_text(MBT_SPEC.replace("width: 32", "width: 16"))
    code, out, err = run_cli(*["train", str(other), "--init", str(tmp_path / "imp"), "--steps", "1",
                                        "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "--init" in (out + err) and "parameter shapes differ" in (out + err)


def test_missing_left_over_and_misfitting_tensors_are_listed(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(CAV_SPEC)
    reference = _cav_reference(tmp_path)
    del reference["blocks_a.1.attn.qkv.weight"]
    reference["blocks_a.2.attn.qkv.weight"] = torch.zeros(96, 32)  # a third layer the spec does not have
    reference["decoder_embed.weight"] = torch.zeros(16, 48)
    torch.save(reference, tmp_path / "ref.pth")
    run = tmp_path / "imported"
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "ref.pth"), "--from", "cav-mae", "-o", str(run), "--json"])
    assert code == 2
    error = json.loads(out)["error"]
    assert error["missing"] == ["blocks_a.1.attn.qkv.weight (checkpoint, for unimodal.blocks.audio.1.qkv.weight)"]
    assert error["left_over"] == ["blocks_a.2.attn.qkv.weight"]
    assert error["shapes"] == ["checkpoint decoder_embed.weight [16, 48] does not fit avdsl decoder_audio_from.weight [16, 32]"]
    assert not run.exists() or not any(run.iterdir())


def test_a_spec_with_other_depths_lists_the_layers_in_ranges(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(CAV_SPEC.replace("depth: 2}", "depth: 1}"))
    torch.save(_cav_reference(tmp_path), tmp_path / "ref.pth")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "ref.pth"), "--from", "cav-mae", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "left over (" in (out + err) and "blocks_a.1.attn.qkv.weight" in (out + err)


def test_a_spec_with_another_position_table_is_refused(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(CAV_SPEC)
    reference = _cav_reference(tmp_path)
    reference["pos_embed_v"] = reference["pos_embed_v"].flip(-1)  # e.g. sin-cos halves in the other order
    torch.save(reference, tmp_path / "ref.pth")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "ref.pth"), "--from", "cav-mae", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "fixed tables that differ (1):\n  checkpoint pos_embed_v vs avdsl video_position.pos" in (out + err)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_files_are_refused(run_cli, tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(CAV_SPEC)
    with open(tmp_path / "code.pth", "wb") as handle:
        pickle.dump({"x": _Payload()}, handle)
    torch.save({"x": _Payload()}, tmp_path / "code2.pth")
    for name in ("code.pth", "code2.pth"):
        code, out, err = run_cli("import", *[str(spec), str(tmp_path / name), "--from", "cav-mae", "-o", str(tmp_path / "o")])
        assert code == 2 and "unpickled code ran" not in out + err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zipfile
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as z:
        z.write(tmp_path / "obj.npy", "obj.npy")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "obj.npz"), "--from", "mbt", "-o", str(tmp_path / "o")])
    assert code == 2 and "cannot be read as .npz" in (out + err)
    hostile = _cav_reference(tmp_path) | {"\x1b[2J" + "x" * 5000: torch.zeros(1)}  # a name that drives the terminal
    torch.save(hostile, tmp_path / "name.pth")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "name.pth"), "--from", "cav-mae", "-o", str(tmp_path / "o")])
    assert code == 2 and "\\x1b[2Jxxx" in err and "\x1b" not in err and len(err) < 2000
    monkeypatch.setattr(limits, "MAX_IMPORT_BYTES", 1000)
    np.savez_compressed(tmp_path / "bomb.npz", a=np.zeros(100_000, np.float32))  # a few hundred bytes packed
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "bomb.npz"), "--from", "mbt", "-o", str(tmp_path / "o")])
    assert code == 2 and "once unpacked, more than the limit" in (out + err)
    torch.save({"a": torch.zeros(1000)}, tmp_path / "big.pth")
    code, out, err = run_cli("import", *[str(spec), str(tmp_path / "big.pth"), "--from", "cav-mae", "-o", str(tmp_path / "o")])
    assert code == 2 and "more than the limit of 1,000" in (out + err)


def test_a_state_dict_nested_in_a_training_checkpoint_is_found(tmp_path):
    fmt = porting.parse_format({"format": "x", "doc": "d", "spec": "s", "file": "torch", "nested_in": ["state_dict"],
                                "strip_prefix": ["module."], "tensors": [{"to": "a", "from": "w"}]}, "x.yaml")
    torch.save({"epoch": 3, "state_dict": {"module.w": torch.ones(2)}}, tmp_path / "c.pt")
    state = porting.read_checkpoint(tmp_path / "c.pt", fmt, 10**6, 10)
    assert list(state) == ["w"]
    assert porting.port(fmt, state, {"a": torch.zeros(2)}).state["a"].tolist() == [1.0, 1.0]
    torch.save({"epoch": 3, "w": torch.ones(2)}, tmp_path / "d.pt")  # no state dict inside: not tensors only
    with pytest.raises(porting.CheckpointReadError, match="entry 'epoch' is a int, not a tensor"):
        porting.read_checkpoint(tmp_path / "d.pt", fmt, 10**6, 10)


def test_an_unknown_format_gets_a_suggestion(run_cli, tmp_path):
    code, out, err = run_cli("import", *["tiny/cav-mae", str(tmp_path / "x.pth"), "--from", "cav_mae"])
    assert code == 2 and "did you mean 'cav-mae'" in (out + err)


def test_every_shipped_format_parses_and_names_its_own_file():
    assert {"cav-mae", "cav-mae-ft", "mbt", "zorro-port", "mammut-openclip", "mammut-openclip-l14"} <= set(porting.format_names())
    for name in porting.format_names():
        assert porting.load_format(name).name == name


@pytest.mark.parametrize("bad, message", [
    ({"tensors": [{"to": "a.{w}", "from": "b"}]}, "uses {w}, which no group of the row sets"),
    ({"tensors": [{"to": "a", "from": "b", "how": "nope"}]}, "no transform 'nope'"),
    ({"transforms": {"t": [{"spin": [1]}]}, "tensors": []}, "unknown step 'spin'"),
    ({"tensors": [{"to": "a.{w}", "from": "b.{w}", "each": [{"w": [1, 2], "v": [1]}]}]}, "one length"),
    ({"tensors": [], "extra": 1}, "unknown key 'extra'"),
])
def test_a_malformed_format_is_named(bad, message):
    data = {"format": "x", "doc": "d", "spec": "s", "file": "torch", **bad}
    with pytest.raises(porting.FormatError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        porting.parse_format(data, "x.yaml")


def test_a_tensor_used_twice_is_a_format_error():
    fmt = porting.parse_format({"format": "x", "doc": "d", "spec": "s", "file": "torch",
                                "tensors": [{"to": "a", "from": "s"}, {"to": "b", "from": "s"}]}, "x.yaml")
    with pytest.raises(porting.FormatError, match="uses a tensor twice: checkpoint s"):
        porting.port(fmt, {"s": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)})


def test_regrid_transposes_the_grid_on_one_axis():
    # a reference order f * T + t (2 frequency rows x 3 time columns) read time-major: t * F + f
    t = torch.arange(6.0).view(1, 6, 1)
    assert porting.apply_steps((("regrid", (1, 2)),), (t,)).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_reshape_and_flatten_steps():
    t = torch.arange(12.0).view(3, 4)
    assert porting.apply_steps((("reshape", (1, -1, 4)),), (t,)).shape == (1, 3, 4)
    assert porting.apply_steps((("flatten", (0, 1)),), (t,)).tolist() == list(range(12))


def test_unsqueeze_and_parts_steps():
    t = torch.arange(6.0)
    assert porting.apply_steps((("unsqueeze", (0,)),), (t,)).shape == (1, 6)
    assert porting.apply_steps((("parts", (0, 2, 1, 0)),), (t,)).tolist() == [3, 4, 5, 0, 1, 2]
    assert porting.apply_steps((("parts", (0, 3, 2, 0)),), (t,)).tolist() == [4, 5, 0, 1]
    assert porting.apply_steps((("parts", (0, 3, 1)),), (t,)).tolist() == [2, 3]
    with pytest.raises(ValueError, match="is not 4 equal parts"):
        porting.apply_steps((("parts", (0, 4, 1, 0)),), (t,))
    for bad in ([0, 2, 1, 1], [0, 2], [0, 2, 2], [0, 0, 0]):
        with pytest.raises(porting.FormatError, match="each of 0..n-1 at most once"):
            _format(transforms={"t": [{"parts": bad}]})
    with pytest.raises(porting.FormatError, match="parts comes first"):
        _format(transforms={"t": [{"permute": [1, 0]}, {"parts": [0, 2, 0]}]})


def _format(**data) -> porting.Format:
    return porting.parse_format({"format": "x", "doc": "d", "spec": "s", "file": "torch", "tensors": [], **data}, "x.yaml")


def test_rows_may_share_a_tensor_only_by_taking_different_parts_of_it():
    packed = torch.arange(6.0).view(3, 2)  # query, key, value rows of a packed projection
    rows = [{"to": "q", "from": "w", "how": "q"}, {"to": "kv", "from": "w", "how": "kv"}]
    fmt = _format(transforms={"q": [{"parts": [0, 3, 0]}], "kv": [{"parts": [0, 3, 1, 2]}]}, tensors=rows)
    ported = porting.port(fmt, {"w": packed}, {"q": torch.zeros(1, 2), "kv": torch.zeros(2, 2)})
    assert ported.state["q"].tolist() == [[0, 1]] and ported.state["kv"].tolist() == [[2, 3], [4, 5]]
    # a part no row takes is left over; two rows taking one part use it twice
    fmt = _format(transforms={"q": [{"parts": [0, 3, 0]}]}, tensors=rows[:1])
    with pytest.raises(porting.PortError) as e:
        porting.port(fmt, {"w": packed}, {"q": torch.zeros(1, 2)})
    assert e.value.left_over == ["w (parts 1, 2 of 3 on axis 0: no row takes them)"]
    fmt = _format(transforms={"q": [{"parts": [0, 3, 0]}], "kv": [{"parts": [0, 3, 0, 2]}]}, tensors=rows)
    with pytest.raises(porting.FormatError, match="uses a tensor twice: checkpoint w \\(for q and kv\\)"):
        porting.port(fmt, {"w": packed}, {"q": torch.zeros(1, 2), "kv": torch.zeros(2, 2)})


def test_layer_index_arithmetic_maps_every_second_layer_to_its_own_list():
    fmt = _format(tensors=[{"to": "dec.{i}.a", "from": "blocks.{i}.a"},
                           {"to": "dec.{i*2}.cross", "from": "cross.{i}"},
                           {"to": "dec.{i*2+1}.mlp", "from": "blocks.{i*2+1}.mlp"},
                           {"to": "dec.{i*2}.mlp", "from": "cross.{i}.mlp"}])
    model = {f"dec.{n}.a": torch.zeros(1) for n in range(4)} | {f"dec.{n}.mlp": torch.zeros(1) for n in range(4)}
    model |= {"dec.0.cross": torch.zeros(1), "dec.2.cross": torch.zeros(1)}
    rows = {r.to: r.sources for r in porting.expand(fmt.tensors, list(model))}
    assert rows["dec.2.cross"] == ("cross.1",) and rows["dec.3.mlp"] == ("blocks.3.mlp",) and rows["dec.2.mlp"] == ("cross.1.mlp",)
    assert set(rows) == set(model)
    checkpoint = {f"blocks.{n}.a": torch.full((1,), n) for n in range(4)} | {"blocks.1.mlp": torch.ones(1),
                  "blocks.3.mlp": torch.ones(1), "cross.0": torch.ones(1), "cross.1": torch.ones(1),
                  "cross.0.mlp": torch.ones(1), "cross.1.mlp": torch.ones(1), "cross.2": torch.ones(1)}
    with pytest.raises(porting.PortError) as e:  # a third cross-attention entry for a 4-layer model
        porting.port(fmt, checkpoint, model)
    assert e.value.left_over == ["cross.2"] and not e.value.missing
    with pytest.raises(porting.FormatError, match="A is a whole number of at least 1"):
        _format(tensors=[{"to": "dec.{i*0}.x", "from": "b.{i}"}])


def test_zeros_set_a_bias_the_reference_has_not():
    fmt = _format(tensors=[{"to": "proj.weight", "from": "conv.weight"}], zeros=["proj\\.bias"])
    ported = porting.port(fmt, {"conv.weight": torch.ones(2, 2)}, {"proj.weight": torch.zeros(2, 2), "proj.bias": torch.ones(2)})
    assert ported.zeros == ["proj.bias"] and ported.state["proj.bias"].tolist() == [0.0, 0.0]


def test_own_tensors_keep_the_models_values_and_others_are_still_missing():
    fmt = porting.parse_format({"format": "x", "doc": "d", "spec": "s", "file": "torch", "own": ["head\\..*"],
                                "tensors": [{"to": "a", "from": "w"}]}, "x.yaml")
    model = {"a": torch.zeros(2), "head.weight": torch.full((2,), 7.0)}
    ported = porting.port(fmt, {"w": torch.ones(2)}, model)
    assert ported.own == ["head.weight"] and ported.state["head.weight"].tolist() == [7.0, 7.0]
    with pytest.raises(porting.PortError) as e:
        porting.port(fmt, {"w": torch.ones(2)}, model | {"body.weight": torch.zeros(1)})
    assert e.value.missing == ["body.weight (avdsl, no row of the format sets it)"]


def test_summarise_groups_layer_numbers():
    names = [f"blocks_a.{i}.norm1_a.weight" for i in (0, 1, 2, 5)] + ["mask_token"]
    assert porting.summarise(names) == ["blocks_a.{0-2,5}.norm1_a.weight", "mask_token"]
