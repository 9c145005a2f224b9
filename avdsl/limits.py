"""Every bound avdsl puts on what it reads, in one place.

A spec, a command line, a manifest or a checkpoint may come from anyone. Each quantity that could make
avdsl spend unbounded memory or time is checked against one of these limits *before* the work is done,
and a value over a limit is refused with a message (exit code 2), never truncated silently.
The training limits are repeated as `maximum`s in ``schema.json`` (JSON cannot import them); a test
checks that the two agree.
"""
from __future__ import annotations

# ------------------------------------------------------------------------------ reading files
MAX_SPEC_BYTES = 2_000_000  # a spec file, an `extends:` base, a checkpoint's spec.yaml, a git blob
MAX_MANIFEST_BYTES = 256_000_000  # a --data manifest (.csv / .jsonl)
MAX_MANIFEST_ROWS = 5_000_000  # rows of a manifest
MAX_JSON_BYTES = 1_000_000  # a checkpoint's meta.json
MAX_IMPORT_BYTES = 16_000_000_000  # a reference checkpoint for `avdsl import` (an .npz: its arrays unpacked)
MAX_IMPORT_TENSORS = 100_000  # named tensors in a reference checkpoint
MAX_SHOWN_LINE_CHARS = 10_000  # of the source line quoted under a diagnostic, at most this much is read

# ----------------------------------------------------------------------------- YAML structure
MAX_YAML_NODES = 100_000  # nodes of a spec once aliases are expanded (alias bombs)
MAX_YAML_DEPTH = 64  # nesting of mappings, lists and brackets
MAX_EXTENDS = 16  # specs in one `extends:` chain
MAX_SET_CHARS = 10_000  # one `--set key=value` item
MAX_EXPR_CHARS = 2000  # one expression, routing rule or input declaration
MAX_EXPR_DEPTH = 64  # brackets nested inside one expression (the parser's tree is recursive)
MAX_NUMBER_DIGITS = 30  # digits of a number written in an expression (Python refuses > 4300 anyway)
MAX_ARGUMENT = 1e6  # size of a number argument of an operator that has no narrower range of its own
MAX_LOSS_WEIGHT = 1e6  # size of the weight of a loss term (after multiplying out `a * b * loss(...)`)

# ----------------------------------------------------------------------------- model sizes
MAX_SIZE = 10_000_000  # any whole-number size: a dim, a token count, classes, vocab, a layer width
MAX_SAMPLE_RATE = 1_000_000  # Hz
MAX_STREAMS = 256  # token streams in a spec
MAX_LAYER_STREAMS = 16_384  # layers x streams of one encoder (the routing plan has one entry per pair)
MAX_ROUTING_RULES = 1_000  # rules of one pass once every `use` is expanded
MAX_ROUTING_ENTRIES = 100_000  # (layer, query stream) pairs that the rules of one pass cover, summed over rules
MAX_RULE_SET_NESTING = 32  # rule sets that `use` each other, one inside the next

# ----------------------------------------------------------------------------- training options
MAX_STEPS = 1_000_000_000
MAX_BATCH = 65_536  # per-process batch size
MAX_SYNTHETIC_CLIPS = 10_000_000  # train_size / val_size of the synthetic data
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_EVAL_BATCHES = 1_000_000
MAX_NPROC = 1024
MAX_WORKERS = 256
MAX_LR = 1_000.0
MATERIALIZE_BYTES = 2 * 1024**3  # synthetic clips are pre-rendered into memory only below this total
GIT_TIMEOUT_S = 30.0  # one `git cat-file` of `diff FILE@REV`
STOP_GRACE_S = 30.0  # after SIGTERM/SIGINT, a step that does not finish within this is abandoned
