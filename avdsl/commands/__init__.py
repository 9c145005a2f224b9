"""The commands of the `avdsl` command line, one module per command (or per pair of related ones).

Each command is a plain function whose typer parameters are its options; `ALL` lists them under
their command names, and `avdsl.cli.make_app` registers them. Adding a command: write its function in
a module here (raise `SpecError` or `CommandError` for problems, never print and exit), and add it to
`ALL`.
"""
from __future__ import annotations

from . import bench, build, diff, importing, lint, pictures, schema, sweep, train

ALL = (
    ("build", build.build_command),
    ("train", train.train_command),
    ("eval", train.eval_command),
    ("export", train.export_command),
    ("import", importing.import_command),
    ("lint", lint.lint_command),
    ("diff", diff.diff_command),
    ("graph", pictures.graph_command),
    ("masks", pictures.masks_command),
    ("schema", schema.schema_command),
    ("bench", bench.bench_command),
    ("sweep", sweep.sweep_command),
)
