"""SetCriterion: official parity, gradients, hand cases, invariances, pmap == one device."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, devices_env, reference_outputs, reference_targets
from detr_jax.config import loss_config
from detr_jax.losses import compute_loss, loss_sums, normalise
from test_matching import random_outputs_and_targets

LOSS_NAMES = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]


@pytest.mark.parametrize("method", ["host", "device"])
def test_every_term_matches_official(reference, method):
    _, ref, _ = reference
    total, terms = jax.jit(lambda o, t: compute_loss(o, t, loss_config(), "softmax", method=method))(
        reference_outputs(ref), reference_targets(ref))
    expected = {k[len("loss/"):]: float(v) for k, v in ref.items() if k.startswith("loss/")}
    assert set(terms) == set(expected)  # the official names, _0.._4 for the auxiliary layers
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    assert float(total) == pytest.approx(float(ref["loss_total"]), rel=1e-5)
    weights = {k[len("weight/"):]: float(v) for k, v in ref.items() if k.startswith("weight/")}
    assert float(total) == pytest.approx(sum(float(terms[k]) * w for k, w in weights.items()), rel=1e-6)


def _total(outputs, targets, matched_from=None):
    return compute_loss(outputs, targets, loss_config(), "softmax", method="host")[0]


def test_gradients_match_float64_and_finite_differences(reference):
    _, ref, _ = reference
    targets = reference_targets(ref)
    outputs32 = reference_outputs(ref)
    grad32 = jax.grad(_total)(outputs32, targets)
    with jax.enable_x64(True):
        outputs64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), reference_outputs(ref, "_f64"))
        targets64 = {**targets, "boxes": jnp.asarray(targets["boxes"], jnp.float64)}
        loss64 = jax.jit(lambda o: _total(o, targets64))
        grad64 = jax.grad(lambda o: _total(o, targets64))(outputs64)
        for a, b in zip(jax.tree_util.tree_leaves(grad32), jax.tree_util.tree_leaves(grad64)):
            scale = max(float(np.abs(b).max()), 1e-12)
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * scale)
        # central finite differences of the float64 loss at a few coordinates of each output
        rng = np.random.RandomState(0)
        eps = 1e-6
        for key in ("pred_logits", "pred_boxes"):
            for _ in range(6):
                index = tuple(rng.randint(s) for s in outputs64[key].shape)
                bump = lambda d: {**outputs64, key: outputs64[key].at[index].add(d)}
                numeric = (float(loss64(bump(eps))) - float(loss64(bump(-eps)))) / (2 * eps)
                assert float(grad64[key][index]) == pytest.approx(numeric, rel=1e-4, abs=1e-7), (key, index)
        # matched queries get gradient on their boxes; unmatched queries none (boxes are matched only)
        matched = ref["match/L5/img0_src"]
        unmatched = min(set(range(100)) - set(matched))
        assert np.abs(np.asarray(grad64["pred_boxes"][0, matched[0]])).sum() > 0
        assert np.abs(np.asarray(grad64["pred_boxes"][0, unmatched])).sum() == 0


def test_zero_targets():
    outputs, targets = random_outputs_and_targets(0, batch=2)
    targets["box_valid"][:] = False
    total, terms = compute_loss(outputs, targets, loss_config(), "softmax")
    assert float(terms["loss_bbox"]) == 0.0 and float(terms["loss_giou"]) == 0.0
    assert float(terms["class_error"]) == 100.0  # official: no matched query counts as 0% accuracy
    log_probs = jax.nn.log_softmax(outputs["pred_logits"])
    # every query against no-object; weights all eos_coef, so the weighted mean is the plain mean
    assert float(terms["loss_ce"]) == pytest.approx(float(-log_probs[..., -1].mean()), rel=1e-6)
    predicted = (outputs["pred_logits"].argmax(-1) != 6).sum(-1)
    assert float(terms["cardinality_error"]) == pytest.approx(predicted.mean())
    assert np.isfinite(float(total))


def test_terms_by_hand():
    """One image, 3 queries, 2 classes + no-object, 1 target matched to query 1."""
    logits = np.array([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]]], np.float32)
    boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.4], [0.9, 0.9, 0.1, 0.1]]], np.float32)
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}
    targets = {"labels": np.array([[1, 0]], np.int32), "box_valid": np.array([[True, False]]),
               "boxes": np.array([[[0.4, 0.5, 0.2, 0.2], [0, 0, 0, 0]]], np.float32)}
    total, terms = compute_loss(outputs, targets, loss_config(), "softmax")
    lp = jax.nn.log_softmax(logits[0])
    nll = [-lp[0, 2], -lp[1, 1], -lp[2, 2]]
    ce = (0.1 * nll[0] + nll[1] + 0.1 * nll[2]) / (0.1 + 1 + 0.1)
    assert float(terms["loss_ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(terms["loss_bbox"]) == pytest.approx(0.2, rel=1e-5)  # |0.4 - 0.2| on the height
    # pred [0.3,0.3,0.5,0.7] vs target [0.3,0.4,0.5,0.6]: iou 0.04/0.08, hull = union -> giou 0.5
    assert float(terms["loss_giou"]) == pytest.approx(0.5, rel=1e-5)
    assert float(terms["cardinality_error"]) == pytest.approx(1.0)  # queries 0, 1 predict objects
    assert float(terms["class_error"]) == 0.0
    assert float(total) == pytest.approx(float(ce) + 5 * 0.2 + 2 * 0.5, rel=1e-5)


def focal_outputs(outputs):
    """Softmax-model outputs as a focal model's: the no-object logit dropped (num_classes logits)."""
    drop = lambda o: {**o, "pred_logits": o["pred_logits"][..., :-1]}
    return {**drop(outputs), "aux_outputs": [drop(a) for a in outputs.get("aux_outputs", [])]}


def test_sigmoid_focal_loss_by_hand():
    outputs, targets = random_outputs_and_targets(6, batch=2)
    outputs = focal_outputs(outputs)
    cfg = loss_config(aux_loss=False)
    _, terms = compute_loss(outputs, targets, cfg, "sigmoid_focal")
    from detr_jax.matching import match

    matched = np.asarray(match(outputs, targets, cfg, "sigmoid_focal"))[-1]
    x = outputs["pred_logits"].astype(np.float64)
    onehot = np.zeros_like(x)
    for b, t in zip(*np.nonzero(matched >= 0)):
        onehot[b, matched[b, t], targets["labels"][b, t]] = 1
    p = 1 / (1 + np.exp(-x))
    ce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    expected = (alpha_t * ce * (1 - p_t) ** 2).sum() / max(targets["box_valid"].sum(), 1)
    assert float(terms["loss_ce"]) == pytest.approx(expected, rel=1e-5)
    assert "loss_ce_0" not in terms  # aux_loss=False


def test_invariant_to_target_order_and_query_order():
    outputs, targets = random_outputs_and_targets(7, batch=3)
    total, terms = compute_loss(outputs, targets, loss_config(), "softmax")
    # reverse the target slots of every image (valid boxes now at the end, padding first)
    flipped = {k: v[:, ::-1].copy() for k, v in targets.items()}
    total2, terms2 = compute_loss(outputs, flipped, loss_config(), "softmax")
    # permute the queries, the same way in every decoder layer
    perm = np.random.RandomState(0).permutation(12)
    permute = lambda o: {"pred_logits": o["pred_logits"][:, perm], "pred_boxes": o["pred_boxes"][:, perm]}
    shuffled = {**permute(outputs), "aux_outputs": [permute(a) for a in outputs["aux_outputs"]]}
    total3, terms3 = compute_loss(shuffled, targets, loss_config(), "softmax")
    for other_total, other_terms in ((total2, terms2), (total3, terms3)):
        assert float(other_total) == pytest.approx(float(total), rel=1e-6)
        for name in terms:
            assert float(other_terms[name]) == pytest.approx(float(terms[name]), rel=1e-5, abs=1e-6), name


def _rows(tree, rows):
    return jax.tree.map(lambda x: x[rows], tree)


@pytest.mark.parametrize("classification", ["softmax", "sigmoid_focal"])
def test_sums_of_parts_give_the_loss_of_the_whole_and_fillers_count_nowhere(classification):
    """loss_sums of two parts of a batch, added and normalised, == compute_loss of the batch; images
    marked example_valid False (fillers, no boxes) change nothing."""
    outputs, targets = random_outputs_and_targets(9, batch=5)
    outputs = focal_outputs(outputs) if classification == "sigmoid_focal" else outputs
    targets["box_valid"][3] = False  # an image without boxes (counts: its queries are no-object)
    cfg = loss_config()
    total, terms = compute_loss(outputs, targets, cfg, classification)
    parts = [loss_sums(_rows(outputs, rows), _rows(targets, rows), cfg, classification)
             for rows in (slice(0, 2), slice(2, 5))]
    added = jax.tree.map(lambda a, b: a + b, *parts)
    for other_total, other_terms in (normalise(added, cfg),
                                     compute_loss(*with_fillers(outputs, targets), cfg, classification)):
        assert float(other_total) == pytest.approx(float(total), rel=1e-5)
        assert set(other_terms) == set(terms)
        for name in terms:
            assert float(other_terms[name]) == pytest.approx(float(terms[name]), rel=1e-5, abs=1e-6), name


def with_fillers(outputs, targets):
    """The batch with two fillers inserted (outputs of other images, no boxes, example_valid False)."""
    order = [0, 1, 4, 2, 3, 4, 0]  # rows 2 and 6 become fillers
    fillers = np.array([True, True, False, True, True, True, False])
    targets = {**_rows(targets, order), "example_valid": fillers}
    targets["box_valid"] = targets["box_valid"] & fillers[:, None]
    return _rows(outputs, order), targets


def _pmap_check():
    """Run with 4 simulated devices: the psum of per-device shares == the one-device loss and grads."""
    outputs, targets = random_outputs_and_targets(8, batch=8)
    cfg = loss_config()
    grad_fn = jax.value_and_grad(lambda o, t, axis: compute_loss(o, t, cfg, "softmax", axis_name=axis), has_aux=True)
    (total, terms), grads = grad_fn(outputs, targets, None)
    shard = lambda x: x.reshape(4, 2, *x.shape[1:])

    def step(o, t):
        (share, share_terms), share_grads = grad_fn(o, t, "d")
        return jax.lax.psum(share, "d"), jax.lax.psum(share_terms, "d"), share_grads

    p_total, p_terms, p_grads = jax.pmap(step, axis_name="d")(jax.tree.map(shard, outputs), jax.tree.map(shard, targets))
    unshard = lambda x: np.asarray(x).reshape(-1, *x.shape[2:])
    close = lambda a, b: bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))
    result = {"total": close(p_total[0], total), "devices": jax.local_device_count(),
              "terms": all(close(p_terms[k][0], v) for k, v in terms.items()),
              "grads": all(close(unshard(a), b) for a, b in zip(jax.tree_util.tree_leaves(p_grads),
                                                               jax.tree_util.tree_leaves(grads)))}
    print(json.dumps(result))


def test_pmap_loss_equals_single_device_loss():
    env = devices_env(4, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"total": True, "terms": True, "grads": True, "devices": 4}


if __name__ == "__main__":
    _pmap_check()
