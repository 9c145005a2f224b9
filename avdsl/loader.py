"""Loading a spec: YAML text -> plain data with a source position for every key and value.

Safe by construction: PyYAML's *composer* (no object construction, no tags that build Python objects),
duplicate keys refused, alias expansion and nesting depth bounded. ``extends:`` merges a base spec
(a built-in name or a relative path) under the child, and ``--set a.b=v`` overrides apply last.
Positions survive all of it, so later passes can point at the exact line that caused a problem.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from . import limits
from .diagnostics import Loc, SpecError, did_you_mean

Path_ = tuple  # a path into the spec: ("encoders", "backbone", "depth")

MAX_NODES = limits.MAX_YAML_NODES  # after alias expansion
MAX_DEPTH = limits.MAX_YAML_DEPTH
MAX_BYTES = limits.MAX_SPEC_BYTES
MAX_EXTENDS = limits.MAX_EXTENDS
SUPPORTED_VERSIONS = (1,)


@dataclass
class Doc:
    """A loaded spec: plain data plus where each piece came from."""

    data: dict
    locs: dict = field(default_factory=dict)  # path -> Loc of the value
    key_locs: dict = field(default_factory=dict)  # path -> Loc of the mapping key
    sources: dict = field(default_factory=dict)  # file -> text (for rendering diagnostics)
    file: str = "<spec>"

    def loc(self, *path) -> Loc:
        """The position of ``path``; falls back to the nearest enclosing node that has one."""
        path = tuple(path)
        while path:
            if path in self.locs:
                return self.locs[path]
            path = path[:-1]
        return self.locs.get((), Loc(self.file, 1, 1))

    def key_loc(self, *path) -> Loc:
        path = tuple(path)
        return self.key_locs.get(path) or self.loc(*path)

    def get(self, *path, default=None):
        node = self.data
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return default
        return node

    def resolved_text(self) -> str:
        """The fully merged spec as YAML: what a checkpoint stores and what the hash covers."""
        return yaml.safe_dump(self.data, sort_keys=False, default_flow_style=None, width=100)

    def hash(self) -> str:
        return hashlib.sha256(self.resolved_text().encode()).hexdigest()[:16]


def builtin_specs_dir() -> Path:
    return Path(str(resources.files("avdsl.specs")))


def builtin_names() -> list[str]:
    root = builtin_specs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_spec_path(name_or_path: str, base: Path | None = None) -> Path | None:
    """A path to a spec file: an existing path, or a built-in name like ``zorro`` or ``tiny/zorro``."""
    candidate = Path(name_or_path)
    if base is not None and not candidate.is_absolute():
        candidate = base / candidate
    if _is_file(candidate):
        return candidate
    if not name_or_path.endswith((".yaml", ".yml")):
        builtin = builtin_specs_dir() / f"{name_or_path}.yaml"
        if _is_file(builtin):
            return builtin
    return None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, but False (not an OSError) for names the OS refuses, e.g. too long ones."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or None for a name the OS refuses (NUL byte, symlink loop, too long)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _builtin_spec(name: str) -> Path | None:
    """The built-in spec called ``name`` (``zorro``, ``tiny/zorro``), or None."""
    path = builtin_specs_dir() / f"{name}.yaml"
    return path if _is_file(path) else None


# ----------------------------------------------------------------------------------------- parsing


def _loc(mark, file: str) -> Loc:
    return Loc(file, mark.line + 1, mark.column + 1)


class _Converter:
    """Turns a composed YAML node tree into plain data, recording positions, with bounds."""

    def __init__(self, file: str):
        self.file = file
        self.count = 0
        self.locs: dict = {}
        self.key_locs: dict = {}

    def convert(self, node, path: tuple, depth: int):
        self.count += 1
        here = _loc(node.start_mark, self.file)
        if self.count > MAX_NODES:
            raise SpecError(here, f"the spec expands to more than {MAX_NODES} YAML nodes",
                            "this usually comes from nested aliases (&anchor / *alias); write the values out")
        if depth > MAX_DEPTH:
            raise SpecError(here, f"the spec nests deeper than {MAX_DEPTH} levels",
                            "flatten the structure; avdsl specs need only a few levels")
        if isinstance(node, yaml.ScalarNode) and node.style in ('"', "'"):
            here = here.shifted(1)  # point at the text, not the quote
        elif isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
            here = Loc(self.file, here.line + 1, here.column + 2)  # first line of a block scalar
        self.locs[path] = here
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _COLLECTION_TAGS:
            raise SpecError(_loc(node.start_mark, self.file), f"the YAML tag '{_shown_tag(node.tag)}' is not allowed in a spec",
                            "remove the tag; specs hold plain strings, numbers, lists and mappings")
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise SpecError(_loc(key_node.start_mark, self.file), "a mapping key must be a plain name",
                                    "write keys as simple words, e.g. `depth: 12`")
                _scalar(key_node, self.file)  # refuses tags
                key = str(key_node.value)  # a key is a name: `1:`, `on:`, `null:` stay the text written
                if any(ord(c) < 32 or ord(c) == 127 for c in key):
                    raise SpecError(_loc(key_node.start_mark, self.file), f"the key {key!r} holds a control character",
                                    "names hold letters, digits and '_' only (no newline, tab or escape)")
                if key in out:
                    raise SpecError(_loc(key_node.start_mark, self.file), f"duplicate key '{key}'",
                                    f"'{key}' is already set at line {self.key_locs[path + (key,)].line}; keep one")
                self.key_locs[path + (key,)] = _loc(key_node.start_mark, self.file)
                out[key] = self.convert(value_node, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        return _scalar(node, self.file)


def _shown_tag(tag: str) -> str:
    """A tag as it is written in YAML: ``!!python/object`` rather than ``tag:yaml.org,2002:python/object``."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _expanded_size(root, file: str = "<spec>") -> int:
    """How many nodes the tree under ``root`` has once aliases are written out, counted without
    writing them out (each shared node is counted once and its size reused), so that an alias bomb
    is refused in microseconds. An alias to an enclosing node (a loop) is refused outright."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise SpecError(_loc(node.start_mark, file), "an alias (*name) refers to the mapping or list that contains it",
                            "a spec cannot contain itself; write the values out")
        open_.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        open_.discard(key)
        sizes[key] = min(total, MAX_NODES + 1)
        return sizes[key]

    return size(root)


def _biggest_child(node):
    """The direct child of a mapping or sequence that expands to the most nodes (for the error)."""
    children = [v for _, v in node.value] if isinstance(node, yaml.MappingNode) else list(node.value)
    return max(children, key=_expanded_size, default=node)


def _flow_too_deep(text: str, file: str) -> None:
    """Refuse more than MAX_DEPTH nested ``[``/``{`` before the YAML parser recurses into them
    (10,000 brackets would otherwise take seconds and end in a RecursionError). The YAML scanner
    finds the brackets, so those inside comments and quoted strings do not count."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    try:
        for token in yaml.scan(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(_loc(token.start_mark, file), f"the spec nests deeper than {MAX_DEPTH} levels of brackets",
                                    "flatten the structure; avdsl specs need only a few levels")
            elif isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)):
                depth -= 1
    except yaml.YAMLError as err:
        if "nesting depth" in str(getattr(err, "problem", "")):  # libyaml stops at 1000 levels, before we see them
            _first_bracket_too_deep(text, file)
        return  # not valid YAML: the parser says where


def _first_bracket_too_deep(text: str, file: str) -> None:
    """Raise at the first bracket nested deeper than MAX_DEPTH, counting every bracket in the text."""
    depth = 0
    for match in re.finditer(r"[\[\]{}]", text):
        depth = max(depth + (1 if match.group() in "[{" else -1), 0)
        if depth > MAX_DEPTH:
            before = text[: match.start()]
            line, col = before.count("\n") + 1, match.start() - (before.rfind("\n") + 1) + 1
            raise SpecError(Loc(file, line, col), f"the spec nests deeper than {MAX_DEPTH} levels of brackets",
                            "flatten the structure; avdsl specs need only a few levels")


# Numbers in exponent form that YAML 1.1 (PyYAML) reads as strings but YAML 1.2 as floats: 1e-5, 2E3, 1.5e6
_EXPONENT_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def plain_number(text: str) -> float | None:
    """``1e-5`` and the like as a float (YAML 1.2 reads them so; YAML 1.1 as strings); else None."""
    if _EXPONENT_NUMBER.fullmatch(text.strip()):
        value = float(text)
        if math.isfinite(value):
            return value
    return None


def _scalar(node, file: str):
    """Resolve a scalar with the safe loader's rules (plus YAML 1.2's ``1e-5`` as a number); refuse
    tags that would construct objects."""
    tag = node.tag or ""
    kind = tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else None
    if kind in ("int", "float", "bool", "null"):
        if kind == "int" and len(node.value) > limits.MAX_NUMBER_DIGITS:
            raise SpecError(_loc(node.start_mark, file), f"the number {node.value[:20]}... has {len(node.value)} digits",
                            "sizes and counts in a spec are far smaller; check the number")
        value = yaml.SafeLoader("").construct_object(node)
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(_loc(node.start_mark, file), f"{node.value} is not a finite number",
                            "write an ordinary number; infinities and NaN are not allowed in a spec")
        return value
    if kind == "str" and not node.style and plain_number(node.value) is not None:  # plain, not quoted
        return plain_number(node.value)
    if kind in ("str", "timestamp", "binary", "merge", "value"):
        return str(node.value)  # timestamps and binary kept as their text
    raise SpecError(_loc(node.start_mark, file), f"the YAML tag '{_shown_tag(tag)}' is not allowed in a spec",
                    "remove the tag; specs hold plain strings, numbers, lists and mappings")


def parse_yaml(text: str, file: str, value: bool = False) -> Doc:
    """Parse one YAML document into a `Doc`. Raises `SpecError` for anything malformed.
    With ``value``, the document may be any value (a ``--set`` value), not only a mapping."""
    if len(text) > MAX_BYTES:
        raise SpecError(Loc(file, 1, 1), f"the spec is larger than {MAX_BYTES // 1000} kB",
                        "specs are short; is this the right file?")
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise SpecError(Loc(file, line, 1), "the file contains a NUL byte: it is not a text spec",
                        "pass a .yaml spec file")
    if not text.strip() and not value:
        raise SpecError(Loc(file, 1, 1), "the spec is empty",
                        "start from a built-in spec: `avdsl build zorro`, or write `avdsl: 1` and `extends: zorro`")
    _flow_too_deep(text, file)
    try:
        nodes = _compose(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        loc = _loc(mark, file) if mark else Loc(file, 1, 1)
        what = (err.problem or str(err)).strip()
        context, opened = err.context or "", err.context_mark
        if opened is not None and "quoted scalar" in context:
            raise SpecError(_loc(opened, file), "this is not valid YAML: the quoted string starting here is not closed",
                            "close the quote on the same line (or remove it)") from None
        hint = _yaml_hint(what)
        if "mapping values are not allowed" in what and mark is not None:
            _dedented_scalar_key(text, mark.line, file)
        if opened is not None and "flow" in context:
            bracket = "[" if "sequence" in context else "{"
            hint = f"the '{bracket}' opened at line {opened.line + 1}, column {opened.column + 1} is not closed before this"
        raise SpecError(loc, f"this is not valid YAML: {what}", hint) from None
    except yaml.YAMLError as err:
        raise SpecError(Loc(file, 1, 1), f"this is not valid YAML: {err}", "check indentation and quoting") from None
    except RecursionError:
        raise SpecError(Loc(file, 1, 1), "the spec nests too deeply to read",
                        f"keep nesting under {MAX_DEPTH} levels") from None
    nodes = [n for n in nodes if n is not None]
    if value and len(nodes) <= 1:
        nodes = nodes or [yaml.ScalarNode("tag:yaml.org,2002:null", "")]
        if _expanded_size(nodes[0], file) > MAX_NODES:
            raise SpecError(Loc(file, 1, 1), f"the value expands to more than {MAX_NODES} YAML nodes",
                            "this usually comes from nested aliases (&anchor / *alias); write the values out")
        conv = _Converter(file)
        return Doc(conv.convert(nodes[0], (), 0), conv.locs, conv.key_locs, {file: text}, file)
    if not nodes:
        raise SpecError(Loc(file, 1, 1), "the spec is empty",
                        "start from a built-in spec: `avdsl build zorro`, or write `avdsl: 1` and `extends: zorro`")
    if len(nodes) > 1:
        raise SpecError(_loc(nodes[1].start_mark, file), "the file holds more than one YAML document",
                        "keep one spec per file (remove the `---` separator)")
    if not isinstance(nodes[0], yaml.MappingNode):
        raise SpecError(_loc(nodes[0].start_mark, file), "the top level of a spec must be a mapping of keys",
                        "start with `avdsl: 1` and then keys like `streams:`, `encoders:`")
    if _expanded_size(nodes[0], file) > MAX_NODES:
        raise SpecError(_loc(_biggest_child(nodes[0]).start_mark, file), f"the spec expands to more than {MAX_NODES} YAML nodes",
                        "this usually comes from nested aliases (&anchor / *alias); write the values out")
    conv = _Converter(file)
    try:
        data = conv.convert(nodes[0], (), 0)
    except RecursionError:
        raise SpecError(Loc(file, 1, 1), "the spec nests too deeply to read",
                        f"keep nesting under {MAX_DEPTH} levels") from None
    return Doc(data, conv.locs, conv.key_locs, {file: text}, file)


def _compose(text: str) -> list:
    """YAML text -> node trees. libyaml (when PyYAML has it) is about ten times faster than the
    pure-Python parser, which keeps big specs within the time a diagnostic may take; for a small text
    that is not valid YAML, the pure-Python parser runs again because its messages are clearer."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return list(yaml.compose_all(text, Loader=fast))
        except yaml.YAMLError:
            if len(text) > 100_000:
                raise
    return list(yaml.compose_all(text, Loader=yaml.SafeLoader))


def _dedented_scalar_key(text: str, line: int, file: str) -> None:
    """`heads: 2` written one level too far left makes the deeper line after it a continuation of the
    value 2, and YAML complains about that next line; point at the key that moved instead."""
    lines = text.splitlines()
    here = lines[line] if line < len(lines) else ""
    prev = next((i for i in range(line - 1, -1, -1) if lines[i].strip() and not lines[i].lstrip().startswith("#")), None)
    if prev is None:
        return
    indent = len(lines[prev]) - len(lines[prev].lstrip(" "))
    m = re.match(r"\s*([A-Za-z_][\w-]*):\s+\S", lines[prev])
    if m and len(here) - len(here.lstrip(" ")) > indent:
        raise SpecError(Loc(file, prev + 1, indent + 1), f"`{m.group(1)}:` is indented less than the line after it, "
                        "which YAML then reads as the rest of its value",
                        f"indent `{m.group(1)}:` like the keys around it")


def _yaml_hint(problem: str) -> str:
    if "tab" in problem or "'\\t'" in problem:
        return "YAML indentation uses spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "a value containing ': ' must be quoted, or a key is mis-indented"
    if "found undefined alias" in problem:
        return "an alias (*name) refers to an anchor (&name) that is not defined above it"
    if "expected <block end>" in problem or "did not find expected" in problem:
        return "check the indentation of this line against the lines above it"
    return "check indentation, quoting and brackets near this position"


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a *regular* file of at most ``limit`` bytes. A device (``/dev/zero``), a FIFO or a
    socket is refused before it is opened (reading one could block or never end), and no more than
    ``limit + 1`` bytes are ever read, even from a file whose size the OS reports wrongly (``/proc``).
    Raises OSError (``EFBIG`` when too large, ``EINVAL`` when not a regular file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"not a regular {what} (a device, FIFO or socket)")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1000} kB")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1000} kB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_spec(raw: bytes, shown: str) -> str:
    """UTF-8 bytes -> text, or a `SpecError` at the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw[: err.start].decode("utf-8", errors="replace")
        line = text.count("\n") + 1
        col = len(text.rsplit("\n", 1)[-1]) + 1
        raise SpecError(Loc(shown, line, col), "the spec is not UTF-8 text (a binary file?)",
                        "save the spec as UTF-8") from None


def read_text(path: Path, shown: str) -> str:
    try:
        raw = read_bounded(path, MAX_BYTES, "file")
    except OSError as err:
        if err.errno == errno.EFBIG:
            raise SpecError(Loc(shown, 1, 1), f"the spec is larger than {MAX_BYTES // 1000} kB",
                            "specs are short; is this the right file?") from None
        raise SpecError(Loc(shown, 1, 1), f"cannot read the spec: {err.strerror or err}",
                        "pass a spec file; built-in specs are: " + ", ".join(builtin_names())) from None
    return decode_spec(raw, shown)


# ------------------------------------------------------------------------------ extends and --set


def _merge(base: Doc, child: Doc, path: tuple = ()) -> None:
    """Merge ``child`` into ``base`` in place: mappings merge key by key, anything else replaces."""
    b = base.get(*path) if path else base.data
    c = child.get(*path) if path else child.data
    if path == ("inputs",):
        # an input's key is `name[dims]`: a child's `fbank[B, 64, 32]` replaces the base's `fbank[...]`
        for key in c:
            for old in [k for k in b if _input_name(k) == _input_name(key) and k != key]:
                del b[old]
    for key, value in c.items():
        sub = path + (key,)
        if isinstance(value, dict) and isinstance(b.get(key), dict):
            _merge(base, child, sub)
            continue
        b[key] = value
        for table in ("locs", "key_locs"):
            mine, theirs = getattr(base, table), getattr(child, table)
            for p in [p for p in mine if p[: len(sub)] == sub]:
                del mine[p]
            mine.update({p: l for p, l in theirs.items() if p[: len(sub)] == sub})


def _input_name(key) -> str:
    return str(key).split("[", 1)[0].strip()


STDIN = "-"  # the spec argument that reads a spec from standard input


def read_stdin(stream=None) -> str:
    """A spec from standard input, read only up to the size limit."""
    stream = stream if stream is not None else sys.stdin
    text = stream.read(MAX_BYTES + 1)
    if len(text) > MAX_BYTES:
        raise SpecError(Loc("<stdin>", 1, 1), f"the spec is larger than {MAX_BYTES // 1000} kB",
                        "specs are short; is this the right input?")
    return text


def load_file(path_or_name: str, overrides: list[str] = ()) -> Doc:
    """Load a spec by path, built-in name or ``-`` (standard input), follow ``extends:``, then apply
    ``--set`` overrides."""
    if path_or_name == STDIN:
        text = read_stdin()
        try:
            return load_text(text, "<stdin>", overrides)
        except SpecError as e:
            raise e.with_sources({"<stdin>": text}) from None
    path = resolve_spec_path(path_or_name)
    if path is None and _exists(Path(path_or_name)):
        raise SpecError(Loc(str(path_or_name), 1, 1), f"'{path_or_name}' is not a regular file (a folder, a device or a FIFO?)",
                        "pass a .yaml spec file or a built-in spec name")
    if path is None:
        hint = did_you_mean(path_or_name, builtin_names(), "a spec file or built-in spec")
        raise SpecError(Loc(str(path_or_name), 1, 1), f"no spec file or built-in spec named '{path_or_name}'", hint)
    root_dir = path.resolve().parent
    doc = _load_chain(path, [], root_dir)
    apply_overrides(doc, overrides)
    doc.data.pop("extends", None)
    return doc


def load_text(text: str, file: str = "<spec>", overrides: list[str] = (), folder: Path | None = None,
              read=None) -> Doc:
    """Load a spec from text (tests, editors, a git revision). ``extends`` paths resolve against
    ``folder`` (default: the working directory), read from disk, or with ``read(path) -> text | None``
    when given (a spec at a git revision reads its base at that revision)."""
    doc = parse_yaml(text, file)
    here = Path.cwd() if folder is None else folder
    root = here.resolve() if read is None else Path(os.path.normpath(here))
    doc = _with_base(doc, here, [file], root, read)
    apply_overrides(doc, overrides)
    doc.data.pop("extends", None)
    return doc


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _load_chain(path: Path, seen: list[str], root_dir: Path) -> Doc:
    shown = _shown(path)
    doc = parse_yaml(read_text(path, shown), shown)
    return _with_base(doc, path.parent, seen + [str(path.resolve())], root_dir)


def _with_base(doc: Doc, here: Path, seen: list[str], root_dir: Path, read=None) -> Doc:
    """If ``doc`` extends another spec, load that one and merge ``doc`` over it."""
    parent = doc.data.get("extends")
    if parent is None:
        return doc
    loc = doc.loc("extends")
    if not isinstance(parent, str) or not parent:
        raise SpecError(loc, "`extends` must name one spec", "e.g. `extends: zorro` or `extends: ./base.yaml`")
    if len(seen) > MAX_EXTENDS:
        raise SpecError(loc, f"`extends` chains more than {MAX_EXTENDS} specs", "shorten the chain")
    if "\x00" in parent or not parent.isprintable():
        raise SpecError(loc, f"`extends: {parent!r}` is not a usable file name", "name a spec file or a built-in spec")
    if read is not None and (parent.endswith((".yaml", ".yml")) or parent.startswith((".", "/", "~"))):
        return _with_base_at_revision(doc, here, seen, root_dir, read, parent, loc)
    is_path = (parent.endswith((".yaml", ".yml")) or parent.startswith((".", "/", "~")) or ".." in Path(parent).parts
               or Path(parent).is_absolute() or _is_file(here / parent))
    target = (here / parent) if is_path else _builtin_spec(parent)
    allowed = [root_dir, builtin_specs_dir().resolve()]
    real = _resolved(target) if target is not None else None
    if target is not None and real is None:
        raise SpecError(loc, f"`extends: {parent}` is not a usable file name (a NUL byte, a symlink loop?)",
                        "name a spec file in this spec's folder, or a built-in spec")
    # checked before existence, so that a spec cannot probe which files exist elsewhere
    if target is not None and not any(real.is_relative_to(a) for a in allowed):
        raise SpecError(loc, f"`extends: {parent}` reaches outside the spec's folder",
                        "extend a built-in spec by name, or a file in this spec's folder or below it")
    if target is None or not _is_file(target):
        hint = ("a path is read relative to this spec's folder; is the file name right?" if is_path
                else did_you_mean(parent, builtin_names(), "a built-in spec"))
        raise SpecError(loc, f"`extends: {parent}` names no spec file or built-in spec", hint)
    if str(real) in seen:
        chain = " -> ".join(Path(s).name for s in seen + [str(real)])
        raise SpecError(loc, f"`extends` forms a loop: {chain}", "remove one of the `extends` lines")
    base = _load_chain(real, seen, root_dir)
    return _merged(base, doc)


def _with_base_at_revision(doc: Doc, here: Path, seen: list[str], root_dir: Path, read, parent: str, loc: Loc) -> Doc:
    """`extends:` of a spec read from elsewhere (a git revision): the base is named lexically,
    relative to the spec's own folder there, and read with ``read``."""
    target = Path(os.path.normpath(here / parent))
    if Path(parent).is_absolute() or parent.startswith("~") or ".." in target.parts or not target.is_relative_to(root_dir):
        raise SpecError(loc, f"`extends: {parent}` reaches outside the spec's folder",
                        "extend a built-in spec by name, or a file in this spec's folder or below it")
    if str(target) in seen:
        chain = " -> ".join(Path(s).name for s in seen + [str(target)])
        raise SpecError(loc, f"`extends` forms a loop: {chain}", "remove one of the `extends` lines")
    text = read(target)
    if text is None:
        raise SpecError(loc, f"`extends: {parent}` names no spec file at that revision",
                        "a path is read relative to this spec's folder at the same revision")
    shown = f"{target.as_posix()}@{getattr(read, 'revision', '?')}"
    base = _with_base(parse_yaml(text, shown), target.parent, seen + [str(target)], root_dir, read)
    return _merged(base, doc)


def _merged(base: Doc, doc: Doc) -> Doc:
    """``doc`` merged over its (loaded) base; positions and sources of both are kept."""
    base.sources.update(doc.sources)
    base.data.pop("extends", None)
    _merge(base, doc)
    base.file = doc.file
    base.locs[()] = doc.locs.get((), Loc(doc.file, 1, 1))
    return base


def apply_overrides(doc: Doc, overrides) -> None:
    """Apply ``--set`` overrides in order. Their text is kept as the source ``<--set>``, one line per
    override, so an error in one shows that override with a caret under the problem."""
    if not overrides:
        return
    doc.sources["<--set>"] = "\n".join(overrides)
    for line, item in enumerate(overrides, 1):
        try:
            apply_override(doc, item, line)
        except SpecError as e:
            raise e.with_sources(doc.sources) from None


def _override_value(raw: str, where: Loc, item: str):
    """The value of a ``--set``: a YAML scalar or flow collection, with the bounds of a spec file
    (nesting, alias expansion, finite numbers); text that is not YAML stays a plain string."""
    if not raw.strip():
        return ""
    try:
        doc = parse_yaml(raw, "<--set>", value=True)
    except SpecError as err:
        if "not valid YAML" in err.diagnostic.message:
            return raw
        raise SpecError(where, f"`--set {_clipped(item)}`: {err.diagnostic.message}", err.diagnostic.hint) from None
    return doc.data


def _clipped(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width] + "..."


def apply_override(doc: Doc, item: str, line: int = 1) -> None:
    """Apply one ``--set key.path=value``; the value is read as a YAML scalar or flow collection
    (``1e-5`` is a number, as in YAML 1.2). ``key.path=null`` removes the key (or the list item).
    ``line``: which override this is (its line in the ``<--set>`` source)."""
    where = Loc("<--set>", line, 1)
    if len(item) > limits.MAX_SET_CHARS:
        raise SpecError(where, f"`--set {_clipped(item)}` is longer than {limits.MAX_SET_CHARS} characters",
                        "set one value at a time; write bigger changes in a spec that extends this one")
    if "=" not in item:
        raise SpecError(where, f"`--set {_clipped(item)}` has no '='", "write `--set encoders.backbone.depth=6`")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts) or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise SpecError(where, f"`--set {_clipped(item)}`: {_clipped(key)!r} is not a dotted key path",
                        "e.g. `--set vars.fusion_layer=4`")
    if parts[0] == "extends":
        raise SpecError(where, "`--set extends=...` cannot change what a spec extends (the base is already merged)",
                        "write a spec with `extends: NAME` and your changes, or name the base spec directly")
    value = _override_value(raw, where, item)
    node = doc.data
    path: tuple = ()
    offset = len(key) - len(key.lstrip())
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where, above = Loc("<--set>", line, offset + 1), where  # at this part, and at the one before
        offset += len(part) + 1
        if isinstance(node, list):
            if not re.fullmatch(r"-?[0-9]{1,9}", part) or not -len(node) <= int(part) < len(node):
                raise SpecError(where, f"`--set {_clipped(key)}`: '{_clipped(part)}' is not an index of the list at '{'.'.join(map(str, path))}'",
                                f"use an index from 0 to {len(node) - 1}" if node else "the list is empty")
            part = int(part) % len(node)
        elif isinstance(node, dict):
            if not last and part not in node:
                hint = did_you_mean(part, node.keys(), "a key")
                raise SpecError(where, f"`--set {_clipped(key)}`: '{_clipped(part)}' is not in the spec at '{'.'.join(map(str, path)) or 'top level'}'", hint)
        else:
            raise SpecError(above, f"`--set {_clipped(key)}`: '{'.'.join(map(str, path))}' is a value, not a mapping",
                            "set the value itself")
        path = path + (part,)
        if last and value is None:
            _remove(doc, node, part, path, key)
        elif last:
            node[part] = value
            doc.locs = {p: l for p, l in doc.locs.items() if p[: len(path)] != path}
            doc.locs[path] = Loc("<--set>", line, len(key) + 2)
        else:
            node = node[part]


def _remove(doc: Doc, node, part, path: tuple, key: str) -> None:
    """``--set key.path=null``: delete the key (or list item) and the locations of what it held."""
    if isinstance(node, dict) and part not in node:
        raise SpecError(Loc("<--set>", 1, 1), f"`--set {_clipped(key)}=null`: '{_clipped(str(part))}' is not in the spec at "
                        f"'{'.'.join(map(str, path[:-1])) or 'top level'}', so there is nothing to remove",
                        did_you_mean(str(part), node.keys(), "a key"))
    del node[part]
    parent, n = path[:-1], len(path) - 1

    def gone(p: tuple) -> bool:  # the removed node, and in a list the items after it (their indices moved)
        if len(p) <= n or p[:n] != parent:
            return False
        return p[n] >= part if isinstance(node, list) else p[n] == part

    for table in ("locs", "key_locs"):
        setattr(doc, table, {p: l for p, l in getattr(doc, table).items() if not gone(p)})
