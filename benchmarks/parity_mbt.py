"""MBT against scenic's MBT (JAX/flax), for `python -m benchmarks.parity mbt-cls ...` (see `benchmarks.parity`).

    python -m benchmarks.parity mbt-cls --reference SCENIC --jax DIR [--size paper|small]

SCENIC is the root of your checkout of google-research/scenic; DIR a folder with JAX, flax and what
scenic's MBT model imports, kept out of the environment avdsl runs in (tested with jax/jaxlib 0.10.2
and flax 0.12.8)::

    pip install --target DIR --no-deps jax jaxlib flax ml_dtypes opt_einsum msgpack absl-py \
        immutabledict ml_collections optax chex treescope toolz scipy clu

TensorFlow, which scenic imports for file access only, is replaced by an empty stand-in when it is
not installed.

The spec is `mbt-cls` (the paper's per-modality CLS head; scenic's ``classifier: token``): scenic at
its current revision cannot build the `gap` classifier together with bottlenecks (its bottleneck
width is only set on the token path). Weights: scenic's random init, LayerNorm scales, all biases,
the CLS tokens and the zero-initialised classifier randomised as well, ported by the format `mbt` of
`avdsl import` (runtime/formats/mbt.yaml: flax kernels transposed, the separate Q, K, V projections
concatenated).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from avdsl.api import analyse_text

from .parity import Capture, default_dtype, port, relative, report

# the weights are ported by `avdsl import`'s format `mbt` (data: runtime/formats/mbt.yaml, applied by
# avdsl.runtime.porting), so the parity check and the import are one mapping

PAPER = {"frames": 800, "bins": 128, "video": (32, 224), "width": 768, "depth": 12, "heads": 12, "classes": 527,
         "fusion_layer": 8}
SMALL = {"frames": 64, "bins": 32, "video": (4, 32), "width": 64, "depth": 2, "heads": 4, "classes": 8, "fusion_layer": 1}


def spec_text(size: dict) -> str:
    t, hw = size["video"]
    return f"""\
avdsl: 1
extends: mbt-cls
vars: {{fusion_layer: {size['fusion_layer']}}}
inputs:
  spec[B, {size['frames']}, {size['bins']}]: fbank
  frames[B, 3, {t}, {hw}, {hw}]: video
  labels[B, {size['classes']}]: multilabel({size['classes']})
encoders:
  mbt: {{width: {size['width']}, depth: {size['depth']}, heads: {size['heads']}}}
outputs:
  logits_audio: linear(first(mbt.audio), {size['classes']})
  logits_video: linear(first(mbt.video), {size['classes']}, shared=logits_audio)
"""


def scenic_environment(jax_dir: str | None, scenic: str) -> None:
    if jax_dir:
        sys.path.insert(0, str(Path(jax_dir).resolve()))
    sys.path.insert(0, str(Path(scenic).resolve()))
    if importlib.util.find_spec("tensorflow") is None:  # scenic reads files with tf.io.gfile; not here
        for name in ("tensorflow", "tensorflow.io", "tensorflow.io.gfile"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["tensorflow"].io = sys.modules["tensorflow.io"]
        sys.modules["tensorflow.io"].gfile = sys.modules["tensorflow.io.gfile"]


def mbt_cls(args) -> int:
    if not (Path(args.reference) / "scenic" / "projects" / "mbt" / "model.py").is_file():
        raise SystemExit(f"{args.reference}/scenic/projects/mbt/model.py not found: pass the root of a scenic checkout")
    scenic_environment(args.jax, args.reference)
    import jax
    import jax.numpy as jnp
    import ml_collections
    from scenic.projects.mbt import model as scenic_mbt

    jax.config.update("jax_enable_x64", True)
    size = SMALL if args.size == "small" else PAPER
    config = ml_collections.ConfigDict({"model": {
        "modality_fusion": ("spectrogram", "rgb"), "fusion_layer": size["fusion_layer"], "use_bottleneck": True,
        "test_with_bottlenecks": True, "n_bottlenecks": 4, "share_encoder": False, "mlp_dim": 4 * size["width"],
        "num_layers": size["depth"], "num_heads": size["heads"], "representation_size": None,
        "patches": {"size": [16, 16, 2]}, "hidden_size": size["width"],
        "temporal_encoding_config": {"method": "3d_conv", "kernel_init_method": None},
        "attention_config": {"type": "spacetime"}, "classifier": "token", "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0, "stochastic_droplayer_rate": 0.0}})
    meta = {"num_classes": size["classes"], "target_is_onehot": True}

    def reference(dtype_name: str):
        config.model_dtype_str = dtype_name
        return scenic_mbt.MBTMultilabelClassificationModel(config, meta)

    model = compile_graph_of(spec_text(size), args.set).eval()
    t, hw = size["video"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    fbank = torch.randn(args.batch, size["frames"], size["bins"], generator=gen).double()  # float32 values
    frames = torch.randn(args.batch, 3, t, hw, hw, generator=gen).double()
    labels = (torch.rand(args.batch, size["classes"], generator=gen) < 0.3).double()
    inputs = {"spectrogram": fbank.unsqueeze(-1).expand(-1, -1, -1, 3).numpy(), "rgb": frames.permute(0, 2, 3, 4, 1).numpy()}

    ref32 = reference("float32")
    params = ref32.flax_model.init(jax.random.PRNGKey(args.seed), {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()},
                                   train=False)["params"]
    params = _randomised(params, np.random.RandomState(args.seed))
    flat = {"/".join(p.key for p in path): torch.from_numpy(np.asarray(v, dtype=np.float64))
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    ported = port("mbt", model, flat)
    model.load_state_dict(ported.state)

    results: dict[str, dict] = {}
    n_audio = model.audio_position.pos.shape[1]
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        ref = reference(name) if name != "float32" else ref32
        p = jax.tree_util.tree_map(lambda v: jnp.asarray(v, getattr(jnp, name)), params)
        x = {k: jnp.asarray(v, getattr(jnp, name)) for k, v in inputs.items()}
        capture = {"capture_intermediates": lambda mdl, _method: mdl.name == "Transformer", "mutable": ["intermediates"]}
        train_logits, state = ref.flax_model.apply({"params": p}, dict(x), train=True, **capture)
        eval_logits = ref.flax_model.apply({"params": p}, dict(x), train=False)
        y = jnp.asarray(labels.numpy(), getattr(jnp, name))
        loss = ref.loss_function(train_logits, {"label": {"spectrogram": y, "rgb": y}})
        encoded = torch.from_numpy(np.array(state["intermediates"]["Transformer"]["__call__"][0]))
        # scenic divides the summed loss by (batch + 1e-8): undone here, so that float64 can compare
        loss = torch.tensor(float(loss), dtype=torch.float64) * (args.batch + 1e-8) / args.batch

        model.to(dtype)
        with default_dtype(dtype), torch.no_grad():
            ours = Capture({"mbt": model.mbt})
            out = model(spec=fbank.to(dtype), frames=frames.to(dtype), labels=labels.to(dtype))
            ours.close()
        o = out["outputs"]
        rows = {
            "tokens mbt.audio (CLS first)": relative(ours.out["mbt"]["audio"], encoded[:, :n_audio]),
            "tokens mbt.video (CLS first)": relative(ours.out["mbt"]["video"], encoded[:, n_audio:]),
            "logits_audio": relative(o["logits_audio"], torch.from_numpy(np.array(train_logits["spectrogram"]))),
            "logits_video": relative(o["logits_video"], torch.from_numpy(np.array(train_logits["rgb"]))),
            "logits (evaluation: mean of both)": relative(o["logits"], torch.from_numpy(np.array(eval_logits))),
            "loss classification": relative(out["losses"]["classification"], loss),
        }
        for key, value in rows.items():
            results.setdefault(key, {})[dtype] = value
    print(f"MBT, CLS head (mbt-cls, {args.size} size, batch {args.batch}) vs scenic at {args.reference}: "
          f"max |avdsl - reference| / max |reference|")
    print(f"  ported {len(ported.state)} tensors; scenic's loss divides by batch + 1e-8, rescaled to batch before comparing")
    return report(results)


def compile_graph_of(text: str, overrides):
    from avdsl.compiler import compile_graph

    return compile_graph(analyse_text(text, "<parity>", overrides).graph)


def _randomised(params, rng: np.random.RandomState):
    """scenic's random init, with LayerNorm scales, biases and zero-initialised tensors made random too;
    every value representable in float32, so that the float32 and float64 runs share the weights."""
    import jax

    def one(path, v):
        v = np.asarray(v, dtype=np.float64)
        name = path[-1].key
        if name in ("scale", "bias"):
            v = v + 0.1 * rng.standard_normal(v.shape)
        elif not v.any():
            v = 0.02 * rng.standard_normal(v.shape)
        return v.astype(np.float32).astype(np.float64)
    return jax.tree_util.tree_map_with_path(one, params)
