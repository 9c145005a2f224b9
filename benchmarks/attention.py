"""Per-layer attention time at paper token counts: planned vs dense-with-mask vs unmasked.

For each layer plan and each weight set in it, the attention sub-layer (LayerNorm, Q/K/V, attention,
output projection) runs three ways:
  planned   `StreamTransformer.self_attention`: one SDPA per group of query streams;
  dense     `dense_attention_reference` over all tokens with the routing's boolean mask;
  unmasked  the same without a mask (what a model without routing would cost).
"core" times only the attention kernels (SDPA on already projected Q/K/V), which is the part the
routing can save; the projections cost the same in all three versions.
Mask density = allowed (query, key) pairs / pairs the dense version computes. A per-stream-weight
layer (MBT) runs the dense versions once per weight set, as a one-mask implementation must.
"""
from __future__ import annotations

import torch

from avdsl.routing import Attend, LayerPlan, token_mask
from avdsl.runtime.encoder import StreamTransformer, dense_attention_reference

from .timing import best_of_each

WIDTH, HEADS, DEPTH = 768, 12, 12


def _rule(query, keys, weights="shared"):
    return Attend(query, tuple(keys.split(",")), weights)


ZORRO_COUNTS = {"audio": 256, "video": 784, "fusion": 8}  # specs/zorro.yaml
MBT_COUNTS = {"audio": 400, "video": 3136, "bottleneck": 4}  # specs/mbt.yaml
PLANS = {
    "zorro": (ZORRO_COUNTS, [_rule("audio", "audio"), _rule("video", "video"), _rule("fusion", "audio,video,fusion")]),
    "mbt-unimodal": (MBT_COUNTS, [_rule("audio", "audio", "audio"), _rule("video", "video", "video")]),
    "mbt-bottleneck": (MBT_COUNTS, [_rule("audio", "audio,bottleneck", "audio"), _rule("video", "video,bottleneck", "video"),
                                    _rule("bottleneck", "audio,bottleneck", "audio"),
                                    _rule("bottleneck", "video,bottleneck", "video")]),
    "mbt-vanilla": (MBT_COUNTS, [_rule("audio", "audio,video", "audio"), _rule("video", "audio,video", "video")]),
}


def _core_times(counts: dict, attends: list, batch: int, reps: int, mask: torch.Tensor) -> tuple[float, float]:
    """SDPA alone: planned groups (one unmasked call per group of queries with the same keys) vs one
    masked call over all tokens."""
    F = torch.nn.functional
    qkv = {s: torch.randn(batch, HEADS, n, WIDTH // HEADS) for s, n in counts.items()}
    groups: dict[tuple, list[str]] = {}
    for a in attends:
        groups.setdefault(a.keys, []).append(a.query)

    def planned():
        for keys, qs in groups.items():
            k = torch.cat([qkv[s] for s in keys], dim=2)
            F.scaled_dot_product_attention(torch.cat([qkv[s] for s in qs], dim=2), k, k)

    everything = torch.cat(list(qkv.values()), dim=2)
    with torch.no_grad():
        t = best_of_each({"planned": planned, "dense": lambda: F.scaled_dot_product_attention(
            everything, everything, everything, attn_mask=mask)}, reps)
    return t["planned"], t["dense"]


def time_layer(counts: dict, attends: list, batch: int, reps: int) -> dict:
    """Seconds for one layer's attention, three ways, and the mask density."""
    sets = list(dict.fromkeys(a.weights for a in attends))
    st = StreamTransformer({"": [[(a.query, a.keys, a.weights, False, False) for a in attends]]},
                           {w: (WIDTH, 1, HEADS, 4 * WIDTH) for w in sets}).eval()
    x = {s: torch.randn(batch, n, WIDTH) for s, n in counts.items()}
    order = tuple(counts)
    total = sum(counts.values())
    result = {"planned_s": 0.0, "dense_s": 0.0, "unmasked_s": 0.0, "core_planned_s": 0.0, "core_dense_s": 0.0}
    allowed = 0
    for ws in sets:
        mine = [a for a in attends if a.weights == ws]
        blk = st.blocks[ws][0]
        mask = torch.tensor(token_mask(LayerPlan(tuple(mine)), counts, order))
        allowed += sum(counts[a.query] * sum(counts[k] for k in a.keys) for a in mine)
        plan = [(a.query, a.keys, a.weights, False, False) for a in mine]
        with torch.no_grad():
            t = best_of_each({"planned": lambda: st.self_attention(blk, "all", plan, x),
                              "dense": lambda: dense_attention_reference(blk, "all", x, order, mask),
                              "unmasked": lambda: dense_attention_reference(blk, "all", x, order, None)}, reps)
        for k in ("planned", "dense", "unmasked"):
            result[f"{k}_s"] += t[k]
        core = _core_times(counts, mine, batch, reps, mask)
        result["core_planned_s"] += core[0]
        result["core_dense_s"] += core[1]
    result["density"] = allowed / (len(sets) * total * total)
    return result


def run(batch: int = 1, reps: int = 5) -> dict:
    """Per-plan timings, then per-model rows (MBT averaged over its 12 layers for Lf = 0, 4, 8)."""
    layers = {name: time_layer(counts, attends, batch, reps) for name, (counts, attends) in PLANS.items()}
    rows = {"zorro": layers["zorro"]}
    for fusion in ("bottleneck", "vanilla"):
        for lf in (0, 4, 8):
            mix = [(lf, layers["mbt-unimodal"]), (DEPTH - lf, layers[f"mbt-{fusion}"])]
            rows[f"mbt-{fusion} Lf={lf}"] = {k: sum(n * r[k] for n, r in mix) / DEPTH
                                             for k in ("planned_s", "dense_s", "unmasked_s", "core_planned_s", "core_dense_s", "density")}
    for r in list(layers.values()) + list(rows.values()):
        r["planned_over_dense"] = r["planned_s"] / r["dense_s"]
        r["planned_over_unmasked"] = r["planned_s"] / r["unmasked_s"]
        r["core_over_dense"] = r["core_planned_s"] / r["core_dense_s"]
        r["target_met"] = r["planned_over_dense"] <= r["density"] + 0.1
        r["core_target_met"] = r["core_over_dense"] <= r["density"] + 0.1
    return {"batch": batch, "width": WIDTH, "heads": HEADS, "layers": layers, "models": rows}


def render(result: dict) -> str:
    lines = [f"attention sub-layer per layer, batch {result['batch']}, width {result['width']}, fp32 "
             f"(times in ms; target: planned/dense <= density + 0.1)",
             f"{'model / layer':<26}{'density':>8}{'planned':>10}{'dense':>10}{'unmasked':>10}"
             f"{'pl/dense':>10}{'pl/unm':>8}  target{'core pl/dense':>15}  target"]
    for group in ("layers", "models"):
        for name, r in result[group].items():
            lines.append(f"{name:<26}{r['density']:>8.3f}{r['planned_s'] * 1e3:>10.1f}{r['dense_s'] * 1e3:>10.1f}"
                         f"{r['unmasked_s'] * 1e3:>10.1f}{r['planned_over_dense']:>10.3f}{r['planned_over_unmasked']:>8.3f}"
                         f"  {'met' if r['target_met'] else 'MISSED':<6}{r['core_over_dense']:>15.3f}  "
                         f"{'met' if r['core_target_met'] else 'MISSED'}")
        lines.append("")
    return "\n".join(lines)
