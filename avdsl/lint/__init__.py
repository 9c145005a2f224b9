"""`avdsl lint`: rules over a spec's structure, routing (information flow), shapes and losses.

`RULES` is the rule table (one place per rule); `lint_one` runs them on a spec; `analyse_flow` is
the information-flow analysis the routing rules use.
"""
from .flow import Flow, analyse_flow
from .rules import BY_CODE, RULES, Context, Rule, run_checks
from .runner import LintResult, lint_one, spec_targets

__all__ = ["BY_CODE", "RULES", "Context", "Flow", "LintResult", "Rule", "analyse_flow", "lint_one", "run_checks",
           "spec_targets"]
