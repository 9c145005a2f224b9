"""Property-based tests: whatever text arrives, the front end answers with a `SpecError` or a result.

Never another exception, never a hang. Three kinds of input:

* expressions: random strings and mutations of valid ones, for each start rule of the grammar (decl,
  rule, expr), into `avdsl.expr.parse`; the reported column must lie within the text (+1);
* whole specs: random YAML documents, and mutations of every built-in spec (text-level: delete,
  duplicate, truncate, insert characters, swap numbers for 0/-1/huge, rename keys; data-level: delete
  a key, change a value's type), into `avdsl.api.analyse_text`;
* loading safety: tags that construct objects are refused, alias expansion and nesting are bounded;
* ``--set`` values (hostile, mutated and random values at real and made-up keys of a shipped spec) and
  manifests (rows dropped, retyped, replaced by random JSON or raw bytes): only `SpecError` /
  `ManifestError`, fast.

The hypothesis profile ``avdsl-ci`` is fixed (derandomized, no deadline) so CI runs the same examples
every time; EXAMPLES says how many per property. The counts actually run are printed (pytest -s).
"""
from __future__ import annotations

import copy
import re
import time
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avdsl import expr as ex
from avdsl.api import analyse_text
from avdsl.diagnostics import Loc, SpecError
from avdsl.loader import MAX_DEPTH, MAX_NODES, builtin_names, builtin_specs_dir, parse_yaml

EXAMPLES = 300  # per property
settings.register_profile("avdsl-ci", max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
CI = settings.get_profile("avdsl-ci")
RUNS: Counter = Counter()  # examples run per property, printed at the end of each test

VALID = {
    "decl": ["frames[B, 3, 8, 224, 224] : video", "fbank[B, 512, 128]: fbank", "label[B]: label(527)",
             "wave[B, 48000]: waveform(48000)", "text[B, 16]: text"],
    "rule": ["fusion <- audio, video, fusion @ 0..12", "audio <- audio", "bottleneck <- video, bottleneck via video",
             "text <- text (causal)", "use fusion_rules @ fusion_layer..", "q <- k @ 1..:2", "x <- y @ 3"],
    "expr": ["tubelet(2, 16, 16)", "nce(za, zv, tau=0.08) + 0.5 * ce(logits, label)", "mean(backbone.audio)",
             "linear(mean(a.b, c.d), 512, bias=false)", "mlp(x, [512, 256], norm=ln)", "-1.5e3 / (2 - x)",
             "patches(fbank, [16, 16])", "'quoted' + \"double\""],
}
GRAMMAR_CHARS = "()[],:.@<-=+*/ \t0123456789eE_abcxyz\"'#;!{}"


def check_parse(text: str, start: str) -> None:
    try:
        ex.parse(text, start, Loc("<t>", 1, 1))
    except SpecError as err:
        column = err.loc.column
        assert 1 <= column <= len(text) + 1, (text, start, column)
        assert err.diagnostic.message and err.diagnostic.hint


@st.composite
def mutated(draw, originals: list[str], alphabet: str) -> str:
    """A valid text with a few characters inserted, deleted or replaced."""
    text = draw(st.sampled_from(originals))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = draw(st.sampled_from(alphabet))
        if op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + ch + text[i + 1:]
    return text


@pytest.mark.parametrize("start", ["decl", "rule", "expr"])
@CI
@given(data=st.data())
def test_grammar_random_text_raises_only_spec_errors(start, data):
    text = data.draw(st.one_of(st.text(max_size=60), st.text(alphabet=GRAMMAR_CHARS, max_size=60)))
    RUNS[f"grammar random {start}"] += 1
    check_parse(text, start)


@pytest.mark.parametrize("start", ["decl", "rule", "expr"])
@CI
@given(data=st.data())
def test_grammar_mutations_raise_only_spec_errors(start, data):
    text = data.draw(mutated(VALID[start], GRAMMAR_CHARS))
    RUNS[f"grammar mutation {start}"] += 1
    check_parse(text, start)


def test_grammar_accepts_the_valid_examples():
    """The mutation seeds are valid, so the mutations are near misses (not random noise)."""
    for start, texts in VALID.items():
        for text in texts:
            ex.parse(text, start, Loc("<t>"))


# ------------------------------------------------------------------------------- whole specs

SPEC_TEXTS = {name: (builtin_specs_dir() / f"{name}.yaml").read_text() for name in builtin_names()}
SPEC_DATA = {name: yaml.safe_load(text) for name, text in SPEC_TEXTS.items()}
NUMBER = re.compile(r"(?<![\w.])\d+(\.\d+)?(?![\w.])")
KEY = re.compile(r"(?m)^(\s*-?\s*)([A-Za-z_][\w]*)(\s*:)")
ODD_NUMBERS = ["0", "-1", "1000000000", "99999999999999999999", "1e308", "0.5", ".nan", "-.inf"]
ODD_VALUES = ["[1, 2]", "{a: 1}", "'text'", "42", "true", "null", "''", "[]", "{}", "-3.5", "*undefined"]
YAML_CHARS = ":[]{}-#&*!|>'\" \t\n,?%@`0123456789abc"


def analyse_or_spec_error(text: str) -> None:
    try:
        analyse_text(text, "<fuzz>")
    except SpecError as err:
        assert err.diagnostic.message


@st.composite
def text_mutation(draw) -> str:
    text = SPEC_TEXTS[draw(st.sampled_from(sorted(SPEC_TEXTS)))]
    lines = text.splitlines(keepends=True)
    kind = draw(st.sampled_from(["delete_line", "duplicate_line", "truncate", "insert", "number", "rename"]))
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    if kind == "delete_line":
        return "".join(lines[:i] + lines[i + 1:])
    if kind == "duplicate_line":
        return "".join(lines[: i + 1] + lines[i:])
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if kind == "insert":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.text(alphabet=YAML_CHARS, min_size=1, max_size=6)) + text[at:]
    if kind == "number":
        found = list(NUMBER.finditer(text))
        if not found:
            return text
        m = draw(st.sampled_from(found))
        return text[: m.start()] + draw(st.sampled_from(ODD_NUMBERS)) + text[m.end():]
    found = list(KEY.finditer(text))
    m = draw(st.sampled_from(found))
    new = draw(st.one_of(st.sampled_from(["", "x", "1", "_", m.group(2) + "s", m.group(2)[:-1] or "y"]),
                         st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)))
    return text[: m.start(2)] + new + text[m.end(2):]


def _paths(node, prefix=()):
    """Every path into a nested structure of dicts and lists."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def data_mutation(draw) -> str:
    data = copy.deepcopy(SPEC_DATA[draw(st.sampled_from(sorted(SPEC_DATA)))])
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    kind = draw(st.sampled_from(["delete", "retype", "rename"]))
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = draw(st.sampled_from([0, -1, 10**12, 1.5, "text", True, None, [], {}, [1, "a"], {"a": 1}]))
    elif isinstance(parent, dict):
        parent[draw(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True))] = parent.pop(path[-1])
    return yaml.safe_dump(data, sort_keys=False)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["avdsl", "1", "audio <- audio", "mean(x)", "fbank[B, 8]"]))
keys = st.one_of(st.sampled_from(["avdsl", "inputs", "streams", "encoders", "outputs", "losses", "routing", "width",
                                  "depth", "heads", "tokenizer", "input", "latent", "from", "extends", "vars", "train"]),
                 st.text(max_size=6))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@CI
@given(data=st.dictionaries(keys, yaml_values, max_size=8))
def test_random_yaml_documents(data):
    RUNS["random YAML documents"] += 1
    analyse_or_spec_error(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


@CI
@given(text=text_mutation())
def test_text_mutations_of_the_shipped_specs(text):
    RUNS["text mutations of shipped specs"] += 1
    analyse_or_spec_error(text)


@CI
@given(text=data_mutation())
def test_data_mutations_of_the_shipped_specs(text):
    RUNS["data mutations of shipped specs"] += 1
    analyse_or_spec_error(text)


def test_the_shipped_specs_are_valid():
    """The mutation seeds themselves analyse cleanly."""
    for name, text in SPEC_TEXTS.items():
        analyse_text(text, f"{name}.yaml")


def test_print_example_counts(capsys):
    """Not a check: prints how many examples each property ran in this session (shown with -s)."""
    with capsys.disabled():
        for name, count in sorted(RUNS.items()):
            print(f"\nhypothesis: {count} examples: {name}", end="")
        print()


# ------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("tagged", [
    "x: !!python/object/apply:os.system ['echo no']",
    "x: !!python/object/apply:os.system\n  args: ['echo no']",
    "x: !!python/name:os.system ''",
    "x: !!python/object:collections.OrderedDict {}",
    "x: !custom 3",
    "x: !!set {a, b}",
])
def test_tags_that_construct_objects_are_refused(tagged):
    with pytest.raises(SpecError, match="tag"):
        parse_yaml("avdsl: 1\n" + tagged + "\n", "t.yaml")


def test_alias_expansion_is_bounded_and_fast():
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 12))
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=f"more than {MAX_NODES}"):
        parse_yaml(text, "t.yaml")
    assert time.perf_counter() - t0 < 0.5


def test_a_spec_just_under_the_node_bound_loads():
    text = "a0: &a0 [" + ", ".join(["x"] * 99) + "]\nb: [" + ", ".join(["*a0"] * 50) + "]\n"  # about 5,000 nodes
    assert len(parse_yaml(text, "t.yaml").data["b"]) == 50


@pytest.mark.parametrize("nested", [
    "x: " + "[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2),
    "x: " + "{a: " * (MAX_DEPTH + 2) + "1" + "}" * (MAX_DEPTH + 2),
    "x:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(MAX_DEPTH + 2)) + "  " * (MAX_DEPTH + 3) + "v: 1",
    "x: " + "[" * 50_000,
])
def test_nesting_is_bounded(nested):
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="nest|valid YAML"):
        parse_yaml("avdsl: 1\n" + nested + "\n", "t.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_nesting_at_the_bound_loads():
    depth = MAX_DEPTH - 2
    doc = parse_yaml("x: " + "[" * depth + "1" + "]" * depth + "\n", "t.yaml")
    node = doc.data["x"]
    for _ in range(depth - 1):
        node = node[0]
    assert node == [1]


# ------------------------------------------------------------------------ --set values and manifests

FAST = settings(CI, max_examples=60)  # a few seconds each
SET_KEYS = ["name", "vars.fusion_layer", "encoders.backbone.depth", "encoders.backbone.width", "encoders.backbone.heads",
            "encoders.backbone.mlp_ratio", "encoders.backbone.routing.0", "streams.audio.tokenizer", "inputs",
            "losses", "outputs.za", "train.lr", "train.batch_size", "dims.B", "extends", "routing.\u00b2",
            "encoders..depth", "encoders.backbone.streams.99", "streams.audio"]
SET_VALUES = ["0", "-1", "1e999", ".nan", "-.inf", "9" * 400, "[" * 200, "{a: " * 80, "*x", "&a [*a]", "!!python/name:os.system",
              "[&a [x, x, x, x], &b [*a, *a, *a, *a], [*b, *b, *b, *b]]", "'", '"\\x00"', "a: b", "- x", "~", "", "\u00b2",
              "mean(", "nce(za, zv, tau=0)", "audio <- audio @ 0..99999", "patch2d(0, 0)", "\x1b[31m", "x\ny"]


@st.composite
def set_item(draw) -> str:
    """`key=value` with a key near the base spec's keys and a hostile, mutated or random value."""
    key = draw(st.one_of(st.sampled_from(SET_KEYS), st.from_regex(r"[a-z_.0-9]{1,20}", fullmatch=True)))
    value = draw(st.one_of(st.sampled_from(SET_VALUES), mutated(SET_VALUES[:12], YAML_CHARS), st.text(max_size=30)))
    return f"{key}={value}"


@FAST
@given(items=st.lists(set_item(), min_size=1, max_size=3))
def test_set_values_raise_only_spec_errors(items):
    RUNS["--set mutations"] += 1
    t0 = time.perf_counter()
    try:
        _analyse_with(items)
    except SpecError as err:
        assert err.diagnostic.message
    assert time.perf_counter() - t0 < 2.0


def _analyse_with(items: list[str]):
    from avdsl.api import analyse

    return analyse("tiny/zorro", items)


MANIFEST_ROW = {"path": "clip.mp4", "label": 1, "caption": "a red disk", "split": "val"}
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                                     st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


@st.composite
def manifest_text(draw) -> tuple[str, bytes]:
    """A manifest (.jsonl or .csv) whose rows are a valid row with a key dropped, retyped or renamed,
    random JSON values, or raw bytes."""
    import json

    suffix = draw(st.sampled_from([".jsonl", ".csv", ".json", ""]))
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        row = dict(MANIFEST_ROW)
        kind = draw(st.sampled_from(["keep", "drop", "retype", "random", "bytes"]))
        key = draw(st.sampled_from(sorted(row)))
        if kind == "drop":
            row.pop(key)
        elif kind == "retype":
            row[key] = draw(JSON_VALUES)
        if suffix == ".csv":
            line = ",".join(str(row.get(k, "")) for k in MANIFEST_ROW)
        else:
            line = json.dumps(draw(JSON_VALUES)) if kind == "random" else json.dumps(row)
        if kind == "bytes":
            line = draw(st.text(alphabet="{}[]\",:\x00\\ab1", max_size=20))
        lines.append(line)
    header = ",".join(MANIFEST_ROW) + "\n" if suffix == ".csv" and draw(st.booleans()) else ""
    return suffix, (header + "\n".join(lines)).encode("utf-8", "surrogatepass")


@FAST
@given(manifest=manifest_text())
def test_manifests_raise_only_manifest_errors(manifest, tmp_path_factory):
    from avdsl.runtime.contracts import InputSpec
    from avdsl.runtime.data.media import ManifestError, MediaDataset

    RUNS["manifest mutations"] += 1
    suffix, raw = manifest
    path = tmp_path_factory.mktemp("m") / f"m{suffix}"
    path.write_bytes(raw)
    inputs = [InputSpec("label", "label", (), 4), InputSpec("caption", "text", (8,))]
    try:
        data = MediaDataset(path, inputs, split="val", train=False)
    except ManifestError as err:
        assert str(err)
        return
    assert len(data) >= 1
