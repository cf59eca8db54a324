"""Hungarian matching: official indices, brute force, scipy, host vs device, padding, pmap."""
import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from conftest import REPO, devices_env, reference_outputs, reference_targets
from detr_jax.config import loss_config
from detr_jax.matching import cost_matrix, device_assign, index_pairs, match, scipy_assign

METHODS = ["host", "device"]


def assignment_cost(cost, matched, valid):
    """cost [Q, M], matched [M] -> total cost of the valid targets' queries."""
    return float(sum(cost[matched[t], t] for t in np.flatnonzero(valid)))


def check_assignment(matched, valid, num_queries):
    matched = np.asarray(matched)
    assert np.all(matched[~valid] == -1)
    queries = matched[valid]
    assert np.all((queries >= 0) & (queries < num_queries)) and len(set(queries)) == len(queries)


@pytest.mark.parametrize("method", METHODS)
def test_reproduces_official_indices_for_every_layer(reference, method):
    _, ref, _ = reference
    matched = np.asarray(jax.jit(lambda o, t: match(o, t, loss_config(), "softmax", method))(
        reference_outputs(ref), reference_targets(ref)))
    assert matched.shape == (6, 2, 6)
    for layer in range(6):  # 0..4 auxiliary, 5 final
        for image, (queries, targets) in enumerate(index_pairs(matched[layer])):
            np.testing.assert_array_equal(queries, ref[f"match/L{layer}/img{image}_src"])
            np.testing.assert_array_equal(targets, ref[f"match/L{layer}/img{image}_tgt"])


def test_cost_matrix_matches_official(reference):
    _, ref, _ = reference
    targets = reference_targets(ref)
    outputs = reference_outputs(ref)
    cost = np.asarray(cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets, loss_config(), "softmax"))
    for image in range(2):
        official = ref[f"match/L5/img{image}_C"]  # [100, n]: the matrix the official matcher solved
        np.testing.assert_allclose(cost[image, :, :official.shape[1]], official, rtol=1e-5, atol=1e-5)


def random_problem(rng, num_queries, num_targets, ties=False):
    cost = rng.rand(num_queries, num_targets).astype(np.float32)
    if ties:
        cost = np.round(cost * 3).astype(np.float32)
    valid = rng.rand(num_targets) < 0.75
    return cost, valid


def test_small_problems_against_brute_force():
    rng = np.random.RandomState(0)
    device = jax.jit(device_assign)
    for trial in range(60):
        q, m = rng.randint(1, 7), rng.randint(1, 6)
        m = min(m, q)
        cost, valid = random_problem(rng, q, m, ties=trial % 3 == 0)
        rows = np.flatnonzero(valid)
        best = min((sum(cost[p[k], t] for k, t in enumerate(rows)) for p in itertools.permutations(range(q), len(rows))),
                   default=0.0)
        for matched in (scipy_assign(cost, valid), np.asarray(device(cost, valid))):
            check_assignment(matched, valid, q)
            assert assignment_cost(cost, matched, valid) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("num_targets", [7, 40, 100])
def test_device_matches_scipy_on_larger_problems(num_targets):
    rng = np.random.RandomState(num_targets)
    costs = rng.uniform(-3, 10, (4, 100, num_targets)).astype(np.float32)
    valid = np.ones((4, num_targets), bool)
    valid[1, num_targets // 2:] = False
    valid[2] = False  # an image without targets
    device = np.asarray(jax.jit(jax.vmap(device_assign))(costs, valid))
    for cost, v, d in zip(costs, valid, device):
        check_assignment(d, v, 100)
        rows, cols = linear_sum_assignment(cost[:, v]) if v.any() else ([], [])
        optimal = float(cost[rows, cols].sum()) if v.any() else 0.0
        assert assignment_cost(cost, d, v) == pytest.approx(optimal, rel=1e-5, abs=1e-4)


def random_outputs_and_targets(seed, batch=3, queries=12, classes=6, max_boxes=5, layers=3):
    rng = np.random.RandomState(seed)
    outputs = {"pred_logits": rng.normal(0, 2, (batch, queries, classes + 1)).astype(np.float32),
               "pred_boxes": rng.uniform(0.05, 0.95, (batch, queries, 4)).astype(np.float32),
               "aux_outputs": [{"pred_logits": rng.normal(0, 2, (batch, queries, classes + 1)).astype(np.float32),
                                "pred_boxes": rng.uniform(0.05, 0.95, (batch, queries, 4)).astype(np.float32)}
                               for _ in range(layers - 1)]}
    valid = np.zeros((batch, max_boxes), bool)
    for b, n in enumerate(rng.randint(0, max_boxes + 1, batch)):
        valid[b, :n] = True
    valid[0] = False  # one image with zero targets
    valid[-1] = True  # one with max_boxes targets
    targets = {"labels": np.where(valid, rng.randint(0, classes, (batch, max_boxes)), 0).astype(np.int32),
               "boxes": np.where(valid[..., None], rng.uniform(0.1, 0.9, (batch, max_boxes, 4)), 0).astype(np.float32),
               "box_valid": valid}
    return outputs, targets


def test_host_and_device_agree_batched_and_single():
    outputs, targets = random_outputs_and_targets(1)
    cfg = loss_config()
    host = np.asarray(match(outputs, targets, cfg, "softmax", "host"))
    device = np.asarray(match(outputs, targets, cfg, "softmax", "device"))
    logits = np.stack([o["pred_logits"] for o in outputs["aux_outputs"]] + [outputs["pred_logits"]])
    boxes = np.stack([o["pred_boxes"] for o in outputs["aux_outputs"]] + [outputs["pred_boxes"]])
    cost = np.asarray(cost_matrix(logits, boxes, targets, cfg, "softmax"))
    for layer in range(3):
        for b in range(3):
            v = targets["box_valid"][b]
            check_assignment(host[layer, b], v, 12)
            assert assignment_cost(cost[layer, b], host[layer, b], v) == pytest.approx(
                assignment_cost(cost[layer, b], device[layer, b], v), abs=1e-5)
            single = {k: (v_[b:b + 1] if k != "aux_outputs" else [{kk: vv[b:b + 1] for kk, vv in a.items()} for a in v_])
                      for k, v_ in outputs.items()}
            single_targets = {k: v_[b:b + 1] for k, v_ in targets.items()}
            np.testing.assert_array_equal(np.asarray(match(single, single_targets, cfg, "softmax", "host"))[layer, 0], host[layer, b])
    assert np.all(host[:, 0] == -1)  # zero targets
    assert np.all(host[:, -1] >= 0)  # max_boxes targets, all matched


@pytest.mark.parametrize("method", METHODS)
def test_padded_targets_are_never_matched(method):
    outputs, targets = random_outputs_and_targets(2)
    # make each padded column a perfect copy of some prediction: the cheapest pair if it counted
    targets["boxes"] = np.where(targets["box_valid"][..., None], targets["boxes"], outputs["pred_boxes"][:, :5])
    targets["labels"] = np.where(targets["box_valid"], targets["labels"], outputs["pred_logits"][:, :5].argmax(-1))
    matched = np.asarray(match(outputs, targets, loss_config(), "softmax", method))
    assert np.all(matched[:, ~targets["box_valid"]] == -1)


def test_no_gradient_through_matching():
    outputs, targets = random_outputs_and_targets(3)
    cfg = loss_config()

    def f(boxes):
        matched = match({**outputs, "pred_boxes": boxes}, targets, cfg, "softmax", "host")
        return (boxes.sum() + matched.sum()).astype(jnp.float32)

    grad = jax.grad(f)(jnp.asarray(outputs["pred_boxes"]))
    np.testing.assert_array_equal(grad, np.ones_like(outputs["pred_boxes"]))


def test_unknown_method():
    outputs, targets = random_outputs_and_targets(4)
    with pytest.raises(ValueError, match="config.loss.matcher"):
        match(outputs, targets, loss_config(), "softmax", "greedy")


def _pmap_check():
    """Run in a subprocess with 4 simulated devices: pmap matching == single-device matching."""
    outputs, targets = random_outputs_and_targets(5, batch=8)
    cfg = loss_config()
    shard = lambda x: x.reshape(4, 2, *x.shape[1:])
    result = {}
    for method in METHODS:
        single = np.asarray(match(outputs, targets, cfg, "softmax", method))
        sharded = jax.pmap(lambda o, t: match(o, t, cfg, "softmax", method))(jax.tree.map(shard, outputs), jax.tree.map(shard, targets))
        gathered = np.asarray(sharded).transpose(1, 0, 2, 3).reshape(single.shape)  # [D, L, B/D, M] -> [L, B, M]
        result[method] = bool(np.array_equal(gathered, single))
    result["devices"] = jax.local_device_count()
    print(json.dumps(result))


def test_matching_inside_pmap():
    env = devices_env(4, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"host": True, "device": True, "devices": 4}


if __name__ == "__main__":
    _pmap_check()
