"""CAV-MAE: exact parameter counts (frozen apart), the joint layer's shared weights and per-pass
LayerNorms, masking and restoring, patch order against the tokenizer, the contrastive direction and
the tiny variant's training step."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.passes.cost import by_component
from avdsl.runtime import embeddings as E
from avdsl.runtime import losses as L
from avdsl.runtime.trial import random_batch

TOTAL, FROZEN = 190_868_224, 906_240


def layer(width: int) -> int:
    """One pre-norm transformer layer with biases, MLP ratio 4, without its two LayerNorms."""
    return 4 * width * width + 4 * width + 2 * 4 * width * width + 4 * width + width


def test_counts_match_the_reference_and_the_built_model():
    analysis = analyse("cav-mae")
    assert analysis.cost.total_params == TOTAL
    assert analysis.cost.total_frozen == FROZEN
    model = compile_graph(analysis.graph, "meta")
    assert sum(p.numel() for p in model.parameters()) == TOTAL
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == FROZEN


def test_count_per_component():
    analysis = analyse("cav-mae")
    parts = by_component(analysis.graph, analysis.cost.params)
    ln768, ln512 = 2 * 768, 2 * 512
    assert parts["encoders.unimodal"] == 2 * 11 * (layer(768) + 2 * ln768)
    assert parts["encoders.joint"] == layer(768) + 3 * 2 * ln768 + 3 * ln768  # 3 passes' norms, 3 final norms
    assert parts["encoders.decoder"] == 8 * (layer(512) + 2 * ln512) + ln512
    assert parts["streams.audio"] == (256 * 768 + 768) + 512 * 768 + 768  # patches, sin-cos, type
    assert parts["streams.video"] == (768 * 768 + 768) + 196 * 768 + 768
    # one decoder projection and one mask token, counted with the stream that owns them
    assert parts["streams.decoder_audio"] == (768 * 512 + 512) + 512 + 512 * 512 + 512
    assert parts["streams.decoder_video"] == 196 * 512 + 512
    assert parts["outputs.audio_pred"] == 512 * 256 + 256
    assert parts["outputs.video_pred"] == 512 * 768 + 768
    # the reference also builds 4 unused LayerNorms in each of its 11 + 11 + 8 single-purpose layers
    unused = 22 * 4 * ln768 + 8 * 4 * ln512
    assert TOTAL + unused == 191_036_160
    encoder = sum(parts[k] for k in ("streams.audio", "streams.video", "encoders.unimodal", "encoders.joint"))
    assert encoder + 22 * 4 * ln768 == 164_500_224


def test_cli_json_shows_total_and_frozen(run_cli):
    code, out, _ = run_cli("build", "cav-mae", "--json")
    assert code == 0
    params = json.loads(out)["parameters"]
    assert (params["total"], params["frozen"], params["trainable"]) == (TOTAL, FROZEN, TOTAL - FROZEN)


def test_masking_keeps_128_audio_and_49_video_tokens():
    t = analyse("cav-mae").graph.tensors
    assert t["audio/tokens"].shape == ("B", 512, 768) and t["audio/tokens"].grid == (64, 8)
    assert t["audio/kept"].shape == ("B", 128, 768)
    assert t["video/kept"].shape == ("B", 49, 768)
    assert t["decoder_audio/restored"].shape == ("B", 512, 512)
    assert t["decoder_video/restored"].shape == ("B", 196, 512)
    kept, mask, _ = E.RandomMask(0.75, 512)(torch.randn(2, 512, 4))
    assert kept.shape == (2, 128, 4) and mask.sum(dim=1).tolist() == [384.0, 384.0]


def test_restore_puts_kept_tokens_back_in_place():
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1).expand(-1, -1, 3).contiguous()
    kept, mask, ids = E.keep_random(x, 4, torch.Generator().manual_seed(0))
    restore = E.Restore(3)
    with torch.no_grad():
        restore.mask_token.fill_(-1.0)
    full = restore(kept, mask, ids)
    visible = mask == 0
    assert torch.equal(full[visible], x[visible])  # every kept token is back at its own position
    assert torch.equal(full[~visible], torch.full_like(full[~visible], -1.0))  # the rest is the mask token
    assert visible.sum(dim=1).tolist() == [4, 4]


def test_decoder_projection_and_mask_token_are_shared():
    analysis = analyse("tiny/cav-mae")
    model = compile_graph(analysis.graph)
    names = dict(model.named_children())
    assert "decoder_audio_from" in names and "decoder_audio_restore" in names
    assert "decoder_video_from" not in names and "decoder_video_restore" not in names
    assert "self.decoder_audio_from(joint_av_v)" in model.code
    assert "self.decoder_audio_restore(decoder_video_from, video_mask, video_ids)" in model.code
    # projection first, then the mask token at the decoder width (as in MAE)
    assert model.decoder_audio_restore.mask_token.shape[-1] == 32


@torch.no_grad()
def test_joint_layer_shares_attention_and_mlp_but_not_layernorms():
    torch.manual_seed(0)
    model = compile_graph(analyse("tiny/cav-mae").graph).eval()
    joint = model.joint
    (block,) = joint.blocks["shared"]
    assert set(block.norm1) == set(block.norm2) == {"audio", "video", "av"}
    assert set(joint.final["shared"]) == {"audio", "video", "av"}
    assert len({id(m) for m in block.norm1.values()}) == 3
    assert sum(1 for n, _ in joint.named_parameters() if n.endswith("qkv.weight")) == 1

    a, v = torch.randn(2, 8, 64), torch.randn(2, 4, 64)
    base = joint(a=a, v=v)
    assert set(base) == {"audio.a", "video.v", "av.a", "av.v"}
    block.norm1["audio"].weight.add_(torch.randn(64))  # only the audio-alone pass uses this LayerNorm
    changed = joint(a=a, v=v)
    assert not torch.allclose(changed["audio.a"], base["audio.a"])
    for key in ("video.v", "av.a", "av.v"):
        assert torch.equal(changed[key], base[key])
    block.qkv.weight.add_(torch.randn_like(block.qkv.weight))  # the attention weights are the same object in every pass
    moved = joint(a=a, v=v)
    for key in base:
        assert not torch.allclose(moved[key], changed[key])


def test_audio_alone_and_video_alone_passes_do_not_mix():
    torch.manual_seed(0)
    model = compile_graph(analyse("tiny/cav-mae").graph).eval()
    a, v = torch.randn(2, 8, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        out = model.joint(a=a, v=v)
        other = model.joint(a=a, v=torch.randn(2, 4, 64))
    assert torch.equal(out["audio.a"], other["audio.a"])
    assert not torch.allclose(out["av.a"], other["av.a"])  # the joint pass does mix


def test_patch_targets_follow_the_tokenizer_order():
    """A tokenizer whose output channel k copies value k of its patch reproduces `patches()` exactly,
    so target row i is the patch of token i, values in the same order."""
    for shape, channels in (((2, 64, 32), 1), ((2, 3, 32, 32), 3)):
        x = torch.randn(*shape)
        per = 8 * 8 * channels
        tok = E.PatchEmbed2d(channels, 8, 8, per)
        with torch.no_grad():
            tok.proj.weight.zero_()
            tok.proj.bias.zero_()
            for i in range(8):
                for j in range(8):
                    for c in range(channels):
                        tok.proj.weight[(i * 8 + j) * channels + c, c, i, j] = 1.0  # patchify's order: row, column, channel
        torch.testing.assert_close(tok(x), L.patchify(x, (8, 8)), rtol=0, atol=1e-6)
    grid = analyse("tiny/cav-mae").graph.tensors["audio/tokens"].grid
    assert grid == (8, 4)  # 64 time frames x 32 bins in 8 x 8 patches: time-major, as patchify rows


def test_contrastive_direction_matches_the_reference_default():
    """The reference scores audio i against video j and normalises over audio for each video (one
    direction); `nce(video, audio, both=false)` is that loss."""
    g = torch.Generator().manual_seed(0)
    audio, video = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    sim = F.normalize(audio, dim=-1) @ F.normalize(video, dim=-1).T / 0.05
    reference = -torch.diag(F.log_softmax(sim, dim=0)).mean()
    torch.testing.assert_close(L.nce(video, audio, tau=0.05, both=False), reference)
    losses = analyse("cav-mae").graph
    contrastive = losses.node("loss.contrastive")
    assert contrastive.weights == (0.01,)
    assert losses.node("loss.reconstruction").weights == (1.0, 1.0)


def test_tiny_trains_one_step_quickly():
    analysis = analyse("tiny/cav-mae")
    assert 3 * 8 * analysis.cost.total_flops < 1e9  # forward + backward of a batch of 8
    torch.manual_seed(0)
    model = compile_graph(analysis.graph)
    batch = random_batch(model.inputs, 8, torch.Generator().manual_seed(0))
    model(**batch)["loss"].backward()  # warm-up
    model.zero_grad()
    start = time.perf_counter()
    out = model(**batch)
    out["loss"].backward()
    elapsed = time.perf_counter() - start
    assert set(out["losses"]) == {"reconstruction", "contrastive"}
    assert torch.isfinite(out["loss"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == ["audio_position.pos", "decoder_audio_position.pos", "decoder_video_position.pos",
                              "video_position.pos"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert elapsed < 5.0, f"a tiny step took {elapsed:.2f} s"  # loose: the test machine may be busy


def test_share_must_name_another_from_stream():
    import pytest

    from avdsl.diagnostics import SpecError

    for bad in ("decoder_vid", "audio", "decoder_video"):
        with pytest.raises(SpecError, match="must name another `from:` stream"):
            analyse("cav-mae", [f"streams.decoder_video.share={bad}"])
    with pytest.raises(SpecError, match="'decoder_video' itself shares the weights of 'decoder_audio'"):
        analyse("cav-mae", ["streams.decoder_audio.share=decoder_video"])
    with pytest.raises(SpecError, match="both or neither need `restore:`"):
        analyse("cav-mae", ["streams.a.share=decoder_audio"])


def test_sincos_table_puts_the_column_first_as_mae():
    # grid 2 rows x 3 columns, width 8: each half is [sin(p w0), sin(p w1), cos(p w0), cos(p w1)]
    # with frequencies w = 1 / 10000^(i / 2), i = 0, 1 -> 1 and 0.01
    def half(p):
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    table = E.sincos_2d(2, 3, 8)
    expected = torch.tensor([half(c) + half(r) for r in range(2) for c in range(3)], dtype=torch.float32)
    assert torch.equal(table, expected)  # token r * 3 + c: column c first, then row r
    rows_first = torch.tensor([half(r) + half(c) for r in range(2) for c in range(3)], dtype=torch.float32)
    assert torch.equal(E.sincos_2d(2, 3, 8, first="rows"), rows_first)


def test_spec_tables_encode_time_first_for_audio_and_the_column_first_for_video():
    model = compile_graph(analyse("tiny/cav-mae").graph, device="cpu")
    # tiny audio grid: 8 time rows x 4 mel columns; tiny video 4 x 4; the reference's audio table puts time first
    assert torch.equal(model.audio_position.pos[0], E.sincos_2d(8, 4, 64, first="rows"))
    assert torch.equal(model.decoder_audio_position.pos[0], E.sincos_2d(8, 4, 32, first="rows"))
    assert torch.equal(model.video_position.pos[0], E.sincos_2d(4, 4, 64, first="columns"))
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_masking_with_given_noise_is_deterministic_and_keeps_the_smallest():
    x = torch.randn(2, 10, 3)
    noise = torch.rand(2, 10)
    first = E.RandomMask(0.6, 10)(x, noise=noise)
    again = E.RandomMask(0.6, 10)(x, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    kept, mask, _ = first
    order = noise.argsort(dim=1)[:, :4]  # the 4 smallest, smallest first
    assert torch.equal(kept, torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, 3)))
    assert torch.equal(mask == 0, torch.zeros_like(mask, dtype=torch.bool).scatter(1, order, True))


def test_given_noise_reaches_the_model_and_only_inside_the_block():
    model = compile_graph(analyse("tiny/cav-mae").graph).eval()
    batch = random_batch(model.inputs, 2, torch.Generator().manual_seed(0))
    noise = {"audio": torch.rand(2, 32), "video": torch.rand(2, 16)}
    with torch.no_grad():
        with E.given_noise(model, noise):
            a = model(**batch)
        with E.given_noise(model, noise):
            b = model(**batch)
        c = model(**batch)  # drawn again: another mask
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["outputs"]["audio_pred"], b["outputs"]["audio_pred"])
    assert not torch.equal(a["outputs"]["audio_pred"], c["outputs"]["audio_pred"])
    with pytest.raises(ValueError, match="no masked or token-dropping stream named audi"):
        with E.given_noise(model, {"audi": noise["audio"]}):
            pass


def test_float64_runs_in_float64_losses_included():
    model = compile_graph(analyse("tiny/cav-mae").graph).double()
    batch = {k: v.double() for k, v in random_batch(model.inputs, 2, torch.Generator().manual_seed(0)).items()}
    out = model(**batch)
    assert out["loss"].dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in out["losses"].values())


def test_random_mask_zero_keeps_every_token_in_place():
    x = torch.randn(2, 10, 3)
    kept, mask, ids = E.RandomMask(0.0, 10)(x, noise=torch.rand(2, 10))
    assert torch.equal(kept, x) and not mask.any() and torch.equal(ids, torch.arange(10).expand(2, 10))
    overrides = ["streams.audio.mask=random_mask(0)", "streams.video.mask=random_mask(0.0)"]
    model = compile_graph(analyse("tiny/cav-mae", overrides).graph).eval()
    batch = random_batch(model.inputs, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(**batch), model(**batch)
    assert torch.equal(a["outputs"]["audio_pred"], b["outputs"]["audio_pred"])  # nothing drawn: the same twice
    assert a["outputs"]["audio_pred"].shape[1] == 32 and a["losses"]["reconstruction"].item() == 0.0  # nothing to score
