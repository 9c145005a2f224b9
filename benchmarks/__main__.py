"""`python -m benchmarks peak|attention|step|compile|ensemble [SPEC...] [--json]` (see the package docstring)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("what", choices=["peak", "attention", "step", "compile", "compile-once", "ensemble"])
    parser.add_argument("specs", nargs="*", help="spec names or files (step, compile)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per benchmark)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (the minimum is reported)")
    parser.add_argument("--precision", default="fp32", help="compile-once: fp32 or bf16")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="step: skip a configuration whose predicted step time exceeds this many seconds")
    parser.add_argument("--members", type=int, default=4, help="ensemble: runs trained together")
    args = parser.parse_args(argv)
    if args.what == "peak":
        from .timing import machine_peaks

        result, text = machine_peaks(), None
    elif args.what == "attention":
        from . import attention

        result = attention.run(args.batch or 1, args.reps)
        text = attention.render(result)
    elif args.what == "step":
        from . import step

        result = step.run(args.specs, args.batch, args.reps, args.budget)
        text = step.render(result)
    elif args.what == "ensemble":
        from . import ensemble

        result = [ensemble.run(spec, args.members, args.batch, args.reps) for spec in args.specs or ["tiny/zorro"]]
        text = ensemble.render(result)
    elif args.what == "compile":
        from . import compile as compile_bench

        result = compile_bench.run(args.specs, args.batch or 2, args.precision)
        text = compile_bench.render(result)
    else:  # one build + compile in this process (run by `compile` in a fresh subprocess)
        from . import compile as compile_bench

        print(json.dumps(compile_bench.once(args.specs[0], args.batch or 2, args.precision)))
        return 0
    print(json.dumps(result, indent=2) if args.json or text is None else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
