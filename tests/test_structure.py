"""The code's shape: one definition per operator, one rule per node kind in every pass, no import cycles."""
import ast
from pathlib import Path

import networkx as nx
import pytest

from avdsl import ops
from avdsl.ir import KINDS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"avdsl": ROOT / "avdsl", "avdsl.runtime": ROOT / "runtime", "avdsl.grammar": ROOT / "grammar",
            "avdsl.specs": ROOT / "specs"}  # as pyproject's package-dir maps them

# string literals equal to an operator name that are not operator names (argument values, table columns)
NOT_OPERATORS = {
    ("none", "avdsl/pictures.py"): "matplotlib's edge colour",
    ("mean", "avdsl/sweep_report.py"): "a statistic over seeds",
    ("none", "avdsl/summary.py"): "text shown for no losses",
    ("tokens", "avdsl/summary.py"): "a table column",
    ("tokens", "avdsl/lint/rules.py"): "a word in a message",
    ("bn", "runtime/heads.py"): "MLP's norm choice",
    ("relu", "runtime/heads.py"): "MLP's activation choice",
    ("none", "runtime/heads.py"): "MLP's norm and activation choice",
    ("none", "runtime/embeddings.py"): "a patch tokenizer's norm choice",
    ("relu", "runtime/encoder.py"): "an encoder activation",
    ("none", "runtime/losses.py"): "torch's reduction argument",
    ("none", "runtime/porting.py"): "text shown for an empty list",
    ("mean", "runtime/losses.py"): "bce's reduction choice",
    ("nce", "runtime/train/toy.py"): "the toy model's own loss name",
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    # docstrings are prose, not names
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def test_each_operator_name_is_written_in_the_catalogue_only():
    found: dict[str, list[str]] = {}
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        for literal in _string_literals(path) & set(ops.OPS):
            if (literal, rel) not in NOT_OPERATORS:
                found.setdefault(literal, []).append(rel)
    elsewhere = {name: files for name, files in found.items() if files != ["avdsl/ops.py"]}
    assert not elsewhere, f"operator names written outside avdsl/ops.py: {elsewhere}"
    assert set(found) == set(ops.OPS)  # the test sees the catalogue itself


def test_every_operator_has_its_rules():
    for op in ops.OPS.values():
        assert op.doc and op.category
        if op.category in ("tokenizer", "position") and not op.adds_nothing:
            assert op.shape and op.cost and op.module, op.name
        elif op.category == "drop":
            assert op.module, op.name
        elif op.category not in ("tokenizer", "position"):
            assert op.shape, op.name
            if op.weights_if:  # a function, or a module when the call sets that argument (`learn_tau=true`)
                assert op.module and op.function, op.name
            else:
                assert (op.module is None) != (op.function is None), f"{op.name}: a module or a function"


def test_every_pass_has_one_rule_per_node_kind():
    from avdsl.compiler import MODULES
    from avdsl.passes import cost, shapes

    for table in (shapes.RULES, cost.RULES, MODULES):
        assert set(table) == set(KINDS)


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The modules of the project that ``name`` imports (anywhere in it, lazily or not)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(name, path, modules):
            # importing a package's submodule runs the package's __init__ first, which is no cycle by itself
            graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_language_never_imports_torch():
    runtime_side = {"avdsl.compiler", "avdsl.api", "avdsl.cli"} | {m for m in _modules() if m.startswith(("avdsl.runtime", "avdsl.commands"))}
    for name, path in _modules().items():
        if name in runtime_side:
            continue
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
              {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert "torch" not in top, name
