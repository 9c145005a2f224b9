"""Benchmarks of avdsl models (not tests: they time things and print ratios side by side).

    python -m benchmarks peak                 # fp32 and bf16 matmul peak of this machine
    python -m benchmarks attention            # planned vs dense-masked vs unmasked attention, paper token counts
    python -m benchmarks attention-dtype      # bf16 attention: bf16 kernel vs fp32, paper shapes (CPU)
    python -m benchmarks step SPEC...         # training step: eager fp32, eager bf16, compiled bf16
    python -m benchmarks step SPEC... --attention both   # eager steps planned vs dense-masked, ratios
    python -m benchmarks compile SPEC...      # cold vs warm build + compile (compile cache)
    python -m benchmarks ensemble [SPEC...]   # N lone training steps vs one vectorized ensemble step (--members N)
    python -m benchmarks profile SPEC --precision bf16   # top operators of one step, matrix work vs the rest
    python -m benchmarks reference-cavmae --reference CHECKOUT --timm DIR   # vs the official CAV-MAE code
    python -m benchmarks allocator [SPEC]     # glibc malloc defaults vs thresholds kept (page faults, system time)

Every command takes ``--json``. `avdsl bench` runs the step benchmark from the command line.
"""
