"""Speed features compute what the reference path computes: fused attention, remat, bfloat16,
buffer donation, frozen stages without a backward pass; and a training epoch builds one program
per shape bucket, reuses them from the persistent compilation cache and writes a profile trace."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from detr_jax import build_model, perf
from detr_jax.config import loss_config
from detr_jax.losses import compute_loss
from detr_jax.models.layers import fused_implementation
from detr_jax.models.detr import box_head, class_head, trainable_mask

# The tiny model with the fewest layers that still has auxiliary outputs: cheap to compile.
SMALL = dict(num_encoder_layers=1, num_decoder_layers=2)
ATTENTIONS_PER_FORWARD = 1 + 2 * 2  # encoder self-attention, decoder self- and cross-attention


def small_config(**options):
    return tiny_config(**{**SMALL, **options})


@pytest.fixture(scope="module")
def problem():
    """Variables of the small model, two padded images and their padded targets."""
    rng = np.random.RandomState(0)
    images = rng.standard_normal((2, 64, 96, 3)).astype(np.float32)
    mask = np.zeros((2, 64, 96), bool)
    mask[0, :, 64:] = True  # image 0 is 64x64: its keys beyond are padding
    images[mask] = 0
    targets = {"labels": rng.randint(0, 5, (2, 4)).astype(np.int32),
               "boxes": rng.uniform(0.2, 0.6, (2, 4, 4)).astype(np.float32),
               "box_valid": np.array([[True, True, False, False], [True, True, True, False]])}
    model = build_model(small_config())
    variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), images, mask))
    return variables, images, mask, targets


def count_fused_calls(monkeypatch):
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def test_fused_attention_matches_the_explicit_softmax(problem, monkeypatch):
    """Inference outputs of every layer: float32 fused within 1e-5 of the explicit path (float
    rounding); bfloat16 fused within bfloat16 rounding of it (logits 0.25 where they span about
    +-3, boxes 0.03)."""
    variables, images, mask, _ = problem
    calls = count_fused_calls(monkeypatch)
    outputs = {}
    for dtype, attention in (("float32", "xla"), ("float32", "fused"), ("bfloat16", "fused")):
        model = build_model(small_config(dtype=dtype, attention=attention))
        before = len(calls)
        outputs[dtype, attention] = jax.jit(model.apply)(variables, images, mask)
        assert len(calls) - before == (ATTENTIONS_PER_FORWARD if attention == "fused" else 0)
    reference = outputs["float32", "xla"]
    assert max_diff(outputs["float32", "fused"], reference) < 1e-5
    bf16 = outputs["bfloat16", "fused"]
    assert np.abs(bf16["pred_logits"] - reference["pred_logits"]).max() < 0.25
    assert np.abs(bf16["pred_boxes"] - reference["pred_boxes"]).max() < 0.03
    assert max_diff(bf16, reference) > 1e-4  # bfloat16 for real


def test_bfloat16_heads_and_attention_logits_run_in_float32(problem):
    """With dtype bfloat16 the class and box heads take the decoder output as float32 and compute
    in float32 (the outputs equal float32 heads applied to the sown bfloat16 ``hs`` to 1e-6; bfloat16
    heads were ~1e-2 off), and the attention logits are accumulated in float32."""
    variables, images, mask, _ = problem
    model = build_model(small_config(dtype="bfloat16"))
    out, sown = jax.jit(lambda v: model.apply(v, images, mask, mutable=["intermediates"]))(variables)
    hs = sown["intermediates"]["hs"][0]
    assert hs.dtype == jnp.bfloat16
    params = variables["params"]
    logits = class_head(5, 32, "softmax").apply({"params": params["class_embed"]}, hs.astype(jnp.float32))
    boxes = jax.nn.sigmoid(box_head(32, False).apply({"params": params["bbox_embed"]}, hs.astype(jnp.float32)))
    np.testing.assert_allclose(out["pred_logits"], logits[-1], atol=1e-6)
    np.testing.assert_allclose(out["pred_boxes"], boxes[-1], atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, mask))(variables).jaxpr
    accumulated = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"
                   and e.invars[0].aval.dtype == jnp.bfloat16 and e.outvars[0].aval.dtype == jnp.float32]
    assert len(accumulated) == ATTENTIONS_PER_FORWARD  # q k^T of every attention, bfloat16 in, float32 out


def equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, remat, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def test_fused_attention_keeps_the_explicit_path_for_dropout_and_intermediates(problem, monkeypatch):
    variables, images, mask, _ = problem
    calls = count_fused_calls(monkeypatch)
    model = build_model(small_config(attention="fused", dropout=0.1))
    rngs = {"dropout": jax.random.PRNGKey(3)}
    jax.eval_shape(functools.partial(model.apply, train=True, rngs=rngs), variables, images, mask)
    assert not calls  # attention dropout needs the explicit weights
    jax.eval_shape(functools.partial(model.apply, mutable=["intermediates"]), variables, images, mask)
    assert not calls  # intermediates (attention maps) are collected
    jax.eval_shape(model.apply, variables, images, mask)
    assert len(calls) == ATTENTIONS_PER_FORWARD


def test_fused_implementation_is_cudnn_only_where_cudnn_runs():
    assert fused_implementation("gpu", jnp.bfloat16, 32, kv_len=850, q_len=100, train=True) == "cudnn"
    assert fused_implementation("gpu", jnp.float16, 64, kv_len=851, q_len=100, train=False) == "cudnn"
    assert fused_implementation("gpu", jnp.bfloat16, 32, kv_len=851, q_len=100, train=True) == "xla"  # odd + mask
    assert fused_implementation("gpu", jnp.float32, 32, kv_len=850, q_len=100, train=False) == "xla"
    assert fused_implementation("gpu", jnp.bfloat16, 36, kv_len=850, q_len=100, train=False) == "xla"
    assert fused_implementation("cpu", jnp.bfloat16, 32, kv_len=850, q_len=100, train=False) == "xla"
    assert fused_implementation("tpu", jnp.bfloat16, 32, kv_len=850, q_len=100, train=False) == "xla"


def loss_and_grads(problem, **options):
    """((DETR loss with auxiliary terms and the host matcher, its gradients) in train mode with
    dropout 0, the primitives of the traced program) for the small model with ``options``."""
    variables, images, mask, targets = problem
    model = build_model(small_config(dropout=0.0, **options))

    def loss(params):
        out = model.apply({**variables, "params": params}, images, mask, train=True)
        return compute_loss(out, targets, loss_config(), "softmax")[0]

    traced = jax.jit(jax.value_and_grad(loss)).trace(variables["params"])
    primitives = {e.primitive.name for e in traced.jaxpr.eqns}
    return traced.lower().compile()(variables["params"]), primitives


@pytest.fixture(scope="module")
def reference_grads(problem):
    """The float32 explicit path without remat."""
    return loss_and_grads(problem)


def test_remat_fused_attention_and_bfloat16_gradients(problem, reference_grads):
    """Loss and gradients in train mode (dropout 0) against the float32 explicit path without remat:
    remat of the transformer layers and backbone blocks with fused attention agrees to 1e-5 relative
    (float rounding), and remat really rematerialises; bfloat16 computation (same options) keeps
    float32 gradients, the loss within 2% and the gradient within cosine 0.99."""
    (ref_loss, ref_grads), ref_primitives = reference_grads
    (value, grads), primitives = loss_and_grads(problem, remat="all", attention="fused")
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    assert max_diff(grads, ref_grads) < 1e-5 * max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads))
    assert "remat2" in primitives and "remat2" not in ref_primitives
    (value, grads), _ = loss_and_grads(problem, remat="all", attention="fused", dtype="bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(value, ref_loss, rtol=0.02)
    a, b = flat(grads), flat(ref_grads)
    assert 0.99 < a @ b / np.linalg.norm(a) / np.linalg.norm(b) < 1 - 1e-6  # close, and not float32's


def test_train_step_donation_frozen_stages_and_bfloat16_state(problem, reference_grads):
    """One pmap'd step of the official optimizer (stem and layer1 frozen, clip 0.1, DETR loss with
    the host matcher) with the state donated: the input buffers are deleted, and the new parameters
    are the optimizer's update with the gradients of the plain loss (no stop_gradient on the frozen
    parameters, which must not move; the reported norm is that of the trainable gradients). With
    bfloat16 computation the step's parameters and optimizer state stay float32."""
    from configs.synthetic import get_config
    from detr_jax.optim import make_optimizer
    from detr_jax.parallel import AXIS, shard
    from detr_jax.training import TrainState, make_train_step

    variables, images, mask, targets = problem
    config = get_config("tiny")
    config.optim.update(schedule="constant", lr=1e-3, lr_backbone=1e-3, clip_norm=0.1)

    def donating_step(dtype):
        config.model = small_config(dropout=0.0, dtype=dtype)
        tx, schedule = make_optimizer(config.optim, variables["params"], config.model, 10.0, 100)
        state = TrainState(step=np.int32(0), params=variables["params"], buffers=variables["buffers"],
                           opt_state=tx.init(variables["params"]), skipped=np.int32(0))
        fn = make_train_step(build_model(config.model), tx, schedule, config.loss, config.model)
        return jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,)), state, tx

    p_step, state, tx = donating_step("float32")
    inputs = jax.tree.map(lambda x: jax.device_put(np.asarray(x)[None]), state)
    batch = shard({"image": images, "padding_mask": mask, **targets}, 1)
    new_state, metrics = jax.device_get(p_step(inputs, batch, jax.random.PRNGKey(1)))
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(inputs))

    (_, grads), _ = reference_grads  # the same model and loss, without stop_gradient
    trainable = trainable_mask(state.params, config.model)
    trainable_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    np.testing.assert_allclose(metrics["grad_norm"][0], optax.tree.norm(trainable_grads), rtol=1e-5)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
    expected = optax.apply_updates(state.params, updates)
    assert max_diff(jax.tree.map(lambda x: x[0], new_state.params), expected) < 1e-5  # 1% of lr: rounding
    frozen_moved = jax.tree.map(lambda a, b, t: not t and bool(np.any(a[0] != b)), new_state.params, state.params,
                                trainable)
    assert not any(jax.tree_util.tree_leaves(frozen_moved))

    bf16_step, bf16_state, _ = donating_step("bfloat16")
    shapes, _ = jax.eval_shape(bf16_step, jax.tree.map(lambda x: np.asarray(x)[None], bf16_state), batch,
                               jax.random.PRNGKey(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((shapes.params, shapes.opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.fixture
def restore_compilation_cache():
    from jax.experimental.compilation_cache import compilation_cache

    yield
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def test_epoch_builds_one_program_per_bucket_cache_and_profile(tmp_path, restore_compilation_cache):
    """One epoch of the synthetic pipeline over two buckets: the train step is built once per
    batch shape seen (at most the number of buckets); a second run loads the programs from the
    persistent cache and ends with the same parameters; the profile trace is written."""
    import json

    from configs.synthetic import get_config
    from detr_jax.data import train_batches
    from detr_jax.training import params_checksum, train_and_evaluate

    config = get_config("tiny")
    config.data.update(data_dir=str(tmp_path / "data"), buckets=((96, 128), (128, 128)),
                       max_boxes=10)  # the device matcher needs max_boxes <= num_queries
    config.loss.matcher = "device"  # host callbacks (the scipy matcher) keep a program out of the cache
    config.model.update(num_encoder_layers=1, num_decoder_layers=1)  # the cheapest to compile
    config.train.update(num_steps=0, num_epochs=1.0, log_every_steps=1, compilation_cache_dir=str(tmp_path / "cache"),
                        profile_steps=1)
    first = train_and_evaluate(config, tmp_path / "first")
    history = [json.loads(line) for line in (tmp_path / "first" / "history" / "train.jsonl").read_text().splitlines()]
    batches = train_batches(config.data, 4, seed=0)
    shapes = {next(batches)["image"].shape for _ in range(batches.num_batches)}
    assert len(history) == batches.num_batches and len(shapes) >= 2
    assert history[-1]["train_step_programs"] == len(shapes) <= 2
    assert list((tmp_path / "first" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))

    config.train.profile_steps = 0
    with perf.CompileWatch() as watch:
        second = train_and_evaluate(config, tmp_path / "second")
    assert watch.cache_hits >= len(shapes)  # every train step program (and more) came from the cache
    assert params_checksum(second.params) == params_checksum(first.params)


@pytest.mark.parametrize("script", ["bench_inference", "bench_train", "bench_compile", "bench_matcher",
                                    "bench_eval", "bench_pipeline", "bench_loop",
                                    "bench_gpu", "bench_msda"])
def test_benchmark_scripts_have_help(script, capsys, monkeypatch):
    import importlib
    import sys

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_gpu_benchmark_dry_run_writes_its_tables_without_tensorflow(tmp_path, monkeypatch):
    """bench/bench_gpu.py --dry_run (tiny model, CPU) runs every row kind and writes the markdown it
    prints; the script imports no tensorflow (the GPU machine has none)."""
    import importlib
    import subprocess
    import sys

    from conftest import REPO

    imported = subprocess.run([sys.executable, "-c", "import sys; import bench_gpu; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"],
                              cwd=REPO / "bench", capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    importlib.import_module("bench_gpu").main(["--dry_run", f"--out={tmp_path / 'gpu.md'}"])
    text = (tmp_path / "gpu.md").read_text()
    assert "| bfloat16 | fused |" in text and "dry run" in text
    train_line = next(line for line in text.splitlines() if line.startswith("| bfloat16 | 1 |"))
    cells = [c.strip() for c in train_line.strip("|").split("|")]
    assert float(cells[3]) > 0 and float(cells[4]) > 0 and cells[5].endswith("%") and cells[6].endswith("%")


def test_msda_benchmark_times_both_paths_and_leaves_out_a_dense_matrix_too_large(tmp_path, monkeypatch):
    import importlib
    import json

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench_msda = importlib.import_module("bench_msda")
    assert bench_msda.level_shapes((800, 1066)) == ((100, 134), (50, 67), (25, 34), (13, 17))
    bench_msda.main(["--size", "64x96", "--decoder_queries", "20", "--repeats", "1", "--max_dense_gib", "1e-4",
                     "--json", str(tmp_path / "msda.json")])
    rows = json.loads((tmp_path / "msda.json").read_text())["rows"]
    assert [(r["problem"], r["impl"], r["pass"]) for r in rows] == [
        (p, i, s) for p in ("decoder", "encoder") for s in ("forward", "forward+backward") for i in ("gather", "dense")]
    timed = {(r["problem"], r["impl"]) for r in rows if r["ms"] is not None}
    assert timed == {("decoder", "gather"), ("decoder", "dense"), ("encoder", "gather")}  # encoder's dense: too large
    assert all(r["gflops"] > 0 and r["program_mib"] > 0 for r in rows if r["ms"] is not None)
