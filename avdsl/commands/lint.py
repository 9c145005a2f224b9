"""`avdsl lint`: check specs for mistakes the build accepts (dead streams, leaks, shadowed rules ...)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from ..diagnostics import did_you_mean
from ..lint import BY_CODE, RULES, lint_one, spec_targets
from .common import EXIT_BAD_SPEC, EXIT_FINDINGS, EXIT_OK, CommandError, out, report


def lint_command(
    paths: Optional[List[str]] = typer.Argument(None, help="Spec files, directories of .yaml specs, or built-in names."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a value in every spec: `--set vars.fusion_layer=4`."),
    as_json: bool = typer.Option(False, "--json", help="Print specs, errors and findings as JSON (for scripts and editors)."),
    explain: Optional[str] = typer.Option(None, "--explain", help="Print what a rule checks and why, e.g. `--explain R204`."),
    list_rules: bool = typer.Option(False, "--list", help="List every rule: code, name, summary."),
    verify: bool = typer.Option(False, "--verify", help="Also build each model and check the information-flow analysis "
                                "numerically (torch.func): every output's measured dependence on every input and stream "
                                "must be what the routing says."),
) -> None:
    """Check specs for likely mistakes: streams no output depends on, outputs named for one modality
    that see another through routing, shadowed routing rules, unused inputs, odd loss weights.

    Exit code 0: no findings; 1: findings; 2: a spec could not be read.
    Silence one finding with `# noqa: CODE` at the end of the line it points at.

    Examples:

      avdsl lint specs

      avdsl lint zorro --json

      avdsl lint --explain R204

      avdsl lint tiny/zorro --verify
    """
    if explain is not None:
        rule = BY_CODE.get(explain.upper())
        if rule is None:
            raise CommandError(f"no lint rule '{explain}'", did_you_mean(explain.upper(), BY_CODE, "a rule code"))
        out.print(f"[bold]{rule.code} {rule.name}[/] ({rule.severity})\n{rule.summary}\n\n{rule.explanation}", soft_wrap=True)
        raise typer.Exit(EXIT_OK)
    if list_rules:
        for rule in RULES:
            out.print(f"{rule.code}  {rule.name:<24} {rule.summary}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_OK)
    if not paths:
        raise CommandError("name at least one spec, directory or built-in spec", "e.g. `avdsl lint specs`")
    results = [lint_one(t, set_ or []) for t in spec_targets(paths)]
    checks = {r.target: _verify(r.target, set_ or []) for r in results if verify and r.error is None and r.sources}  # built: no build error
    if as_json:
        print(json.dumps([{"spec": r.target, "error": r.error.diagnostic.to_json() if r.error else None,
                           "findings": [dict(d.to_json(), rule=BY_CODE[d.code].name) for d in r.findings],
                           **({"verify": _verify_json(checks[r.target])} if r.target in checks else {})}
                          for r in results], indent=2))
    else:
        for r in results:
            if r.error is not None:
                report(r.error)
            for d in r.findings:
                out.print(f"{d.loc}: {d.code} {d.message}", style="bold", highlight=False, markup=False, soft_wrap=True)
                if d.hint:
                    out.print(f"  hint: {d.hint}", highlight=False, markup=False, soft_wrap=True)
            if r.target in checks:
                check = checks[r.target]
                for m in check.mismatches:
                    out.print(f"{r.target}: flow check: {m}", style="bold", highlight=False, markup=False, soft_wrap=True)
                if not check.mismatches:
                    out.print(f"{r.target}: flow check: {check.checked} output/source pairs agree with the analysis",
                              highlight=False, markup=False, soft_wrap=True)
        n = sum(len(r.findings) for r in results) + sum(len(c.mismatches) for c in checks.values())
        bad = sum(r.error is not None for r in results)
        out.print(f"{len(results)} spec{'s' if len(results) != 1 else ''}: {n} finding{'s' if n != 1 else ''}"
                  + (f", {bad} could not be read" if bad else ""), highlight=False)
    if any(r.error for r in results):
        raise typer.Exit(EXIT_BAD_SPEC)
    failed = any(r.findings for r in results) or any(c.mismatches for c in checks.values())
    raise typer.Exit(EXIT_FINDINGS if failed else EXIT_OK)


def _verify(target: str, overrides: list):
    """The numeric flow check of one spec (builds the model: torch is imported only here)."""
    from ..api import analyse, verify_flow

    return verify_flow(analyse(target, overrides))


def _verify_json(check) -> dict:
    return {"checked": check.checked, "unmeasured_streams": check.unmeasured,
            "mismatches": [{"target": m.target, "source": m.source, "routing_allows": m.static, "measured": m.measured}
                           for m in check.mismatches]}
