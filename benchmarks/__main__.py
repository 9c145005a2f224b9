"""`python -m benchmarks peak|attention|step|compile|ensemble [SPEC...] [--json]` (see the package docstring)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("what", choices=["peak", "attention", "attention-dtype", "step", "step-once", "compile",
                                         "compile-once", "ensemble", "reference-cavmae", "reference-cavmae-once",
                                         "profile", "precision", "allocator", "allocator-once"])
    parser.add_argument("specs", nargs="*", help="spec names or files (step, compile)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per benchmark)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (the minimum is reported)")
    parser.add_argument("--precision", default="fp32", help="compile-once, profile: fp32, bf16 or bf16w")
    parser.add_argument("--scope", choices=["regional", "whole"], default="regional",
                        help="compile, step: compile each distinct encoder layer once (regional) or the whole model")
    parser.add_argument("--attention", choices=["planned", "dense", "both"], default="planned",
                        help="step: the encoder layers' attention as planned, dense-masked, or both side by side")
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager",
                        help="profile: eager, or compiled per encoder layer (regional)")
    parser.add_argument("--reference", help="reference-cavmae, profile: path of a checkout of the official CAV-MAE code")
    parser.add_argument("--timm", help="reference-cavmae: folder holding timm 0.4.5 (pip install --target DIR)")
    parser.add_argument("--device", default="cpu", help="reference-cavmae: cpu or cuda")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="step: skip a configuration whose predicted step time exceeds this many seconds")
    parser.add_argument("--members", type=int, default=4, help="ensemble: runs trained together")
    parser.add_argument("--steps", type=int, default=300, help="precision: training steps per run")
    parser.add_argument("--out", help="precision: folder for the runs and the picture (default: a temporary one)")
    parser.add_argument("--allocator", choices=["kept", "default"], default="kept",
                        help="glibc malloc in this process: thresholds fixed as `avdsl train` sets them (kept, "
                             "`avdsl.runtime.memory`) or glibc's defaults (allocator-once)")
    args = parser.parse_args(argv)
    if args.allocator == "kept":  # as `avdsl train` runs, for avdsl and the reference code alike
        from avdsl.runtime.memory import keep_freed_memory

        keep_freed_memory()
    if args.what == "peak":
        from .timing import machine_peaks

        result, text = machine_peaks(), None
    elif args.what == "attention":
        from . import attention

        result = attention.run(args.batch or 1, args.reps)
        text = attention.render(result)
    elif args.what == "attention-dtype":
        from . import attention_dtype

        if args.specs:
            precision = args.precision if args.precision != "fp32" else "bf16w"
            result = attention_dtype.run_steps(args.specs[0], precision, args.batch or 4, args.reps)
            text = attention_dtype.render_steps(result)
        else:
            result = attention_dtype.run(args.batch or 4, min(args.reps, 3))
            text = attention_dtype.render(result)
    elif args.what == "step":
        from . import step

        result = step.run(args.specs, args.batch, args.reps, args.budget, args.scope, args.attention)
        text = step.render(result)
    elif args.what == "step-once":  # one configuration (run by `step` in a fresh subprocess)
        from . import step

        spec, mode, precision = args.specs
        print(json.dumps(step.time_mode(spec, args.batch or 2, mode, precision, args.reps, args.scope, args.attention)))
        return 0
    elif args.what == "allocator":
        from . import allocator

        result = allocator.run(args.specs[0] if args.specs else "cav-mae", args.batch or 4, args.precision, args.mode,
                               min(args.reps, 3))
        text = allocator.render(result)
    elif args.what == "allocator-once":  # one setting (run by `allocator` in a fresh subprocess)
        from . import allocator

        print(json.dumps(allocator.once(args.specs[0], args.batch or 4, args.precision, args.mode, args.reps)))
        return 0
    elif args.what == "precision":
        from . import precision

        result = precision.run(args.specs[0] if args.specs else "tiny/cav-mae", args.steps, args.out)
        text = precision.render(result)
    elif args.what == "ensemble":
        from . import ensemble

        result = [ensemble.run(spec, args.members, args.batch, args.reps) for spec in args.specs or ["tiny/zorro"]]
        text = ensemble.render(result)
    elif args.what == "compile":
        from . import compile as compile_bench

        result = compile_bench.run(args.specs, args.batch or 2, args.precision, args.scope)
        text = compile_bench.render(result)
    elif args.what == "profile":
        from . import profile

        if args.reference and args.specs[0] != "cav-mae":
            parser.error("profile --reference compares with the official CAV-MAE code: the spec must be cav-mae")
        result = profile.run(args.specs[0], args.batch or 2, args.precision, args.reps, args.mode, args.reference,
                             args.timm)
        text = profile.render(result)
    elif args.what == "reference-cavmae":
        from . import reference_cavmae

        if not args.reference:
            parser.error("reference-cavmae needs --reference CHECKOUT (a clone of the official CAV-MAE code)")
        result = reference_cavmae.run(args.reference, args.timm, args.batch or 4, args.reps, args.device)
        text = reference_cavmae.render(result)
    elif args.what == "reference-cavmae-once":  # one configuration (run by `reference-cavmae` in a subprocess)
        from . import reference_cavmae

        who, mode, precision = args.specs
        print(json.dumps(reference_cavmae.once(who, mode, precision, args.batch or 4, args.reps, args.reference,
                                               args.timm, args.device)))
        return 0
    else:  # one build + compile in this process (run by `compile` in a fresh subprocess)
        from . import compile as compile_bench

        print(json.dumps(compile_bench.once(args.specs[0], args.batch or 2, args.precision, args.scope)))
        return 0
    print(json.dumps(result, indent=2) if args.json or text is None else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
