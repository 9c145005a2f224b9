"""The information-flow analysis checked numerically (torch.func) on every shipped spec, at CPU size,
and shown to catch a model that lets information through where the routing forbids it."""
from __future__ import annotations

import json

import pytest

from avdsl import compiler
from avdsl.api import analyse, analyse_text, verify_flow as verify
from avdsl.loader import builtin_names, builtin_specs_dir

# paper specs at CPU size: each root paper spec is its tiny variant (`tiny/NAME` extends NAME and only
# shrinks sizes); a spec derived from one gets that tiny variant's sizes, plus the changes it needs
DERIVED = {
    "zorro-supervised": ("zorro", ["outputs.logits=linear(global_out, 8)"]),
    "zorro-port": ("zorro", ["outputs.pooled=attnpool(global_out, global_out, backbone.fusion, queries=3, heads=4, "
                             "each=true, norm=true, residual=true, bias=false)"]),
    "vatt-agnostic": ("vatt", []),
    "mammut-openclip": ("mammut", []),
    "mbt-cls": ("mbt", ["outputs.logits_audio=linear(first(mbt.audio), 8)",
                        "outputs.logits_video=linear(first(mbt.video), 8, shared=logits_audio)",
                        "outputs.logits=avg(logits_audio, logits_video)"]),
}


CASES = [n for n in builtin_names() if f"tiny/{n}" not in builtin_names()]  # a root paper spec: its tiny variant


def _small(name: str):
    """The spec at CPU size."""
    if name in DERIVED:
        base, overrides = DERIVED[name]
        text = (builtin_specs_dir() / "tiny" / f"{base}.yaml").read_text()
        return analyse_text(text.replace(f"extends: {base}\n", f"extends: {name}\n"), f"tiny-{name}.yaml", overrides)
    return analyse(name)


def test_every_shipped_spec_is_covered():
    for name in builtin_names():
        assert name in DERIVED or name.startswith(("tiny/", "examples/")) or f"tiny/{name}" in CASES, name


@pytest.mark.parametrize("name", CASES)
def test_measured_flow_equals_the_analysis(name):
    analysis = _small(name)
    if name in DERIVED:
        assert analysis.spec.name == f"{DERIVED[name][0]}-tiny" and name in analysis.doc.sources.get(f"tiny-{name}.yaml", "")
    result = verify(analysis)
    assert result.checked >= 6
    assert result.mismatches == [], "\n".join(map(str, result.mismatches))


def _rewire(monkeypatch, change, first_layer_only: bool):
    """Build encoders whose executed plan differs from the analysed one (a planner or runtime bug)."""
    original = compiler.build_encoder

    def built(node, graph):
        encoder = original(node, graph)
        for layers in encoder.plans.values():
            for i in range(1 if first_layer_only else len(layers)):
                layers[i] = tuple(change(attend) for attend in layers[i])
        return encoder

    monkeypatch.setattr(compiler, "build_encoder", built)


def test_a_leak_the_routing_forbids_is_caught(monkeypatch):
    # Zorro: audio tokens must never see video; let layer 0 read video tokens too
    _rewire(monkeypatch, lambda a: a._replace(keys=a.keys + ("video",)) if a.query == "audio" else a, True)
    found = {(m.target, m.source, m.static, m.measured) for m in verify(analyse("tiny/zorro")).mismatches}
    assert ("output:audio_out", "input:frames", False, True) in found
    assert ("output:za", "stream:video", False, True) in found


def test_a_path_the_routing_allows_but_the_model_lacks_is_caught(monkeypatch):
    # Zorro's fusion tokens read audio in every layer; let them read none
    _rewire(monkeypatch, lambda a: a._replace(keys=tuple(k for k in a.keys if k != "audio")) if a.query == "fusion" else a,
            False)
    found = {(m.target, m.source, m.static, m.measured) for m in verify(analyse("tiny/zorro")).mismatches}
    assert ("output:fusion_out", "input:fbank", True, False) in found


def test_lint_verify_from_the_command_line(run_cli):
    code, out, err = run_cli("lint", "tiny/mbt", "--verify", "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["verify"]["checked"] >= 6 and result["verify"]["mismatches"] == []
