"""Tests for fmnist_core.core.metrics, using scikit-learn as the reference."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from fmnist_core.core import metrics as M

N, K = 500, 10
RARE = (3, 7)  # classes pushed down so they are seldom predicted


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    y = rng.integers(0, K, size=N)
    logits = rng.normal(size=(N, K))
    logits[np.arange(N), y] += 1.5  # informative, but far from perfect
    logits[:, list(RARE)] -= 2.5
    probs = _softmax(logits)
    return y, probs


@pytest.fixture(scope="module")
def summary(data):
    y, probs = data
    return M.classification_summary(y, probs)


def test_data_really_has_rare_and_frequent_classes(data):
    y, probs = data
    counts = np.bincount(probs.argmax(1), minlength=K)
    assert set(np.unique(y)) == set(range(K))
    assert all(0 < counts[c] < 15 for c in RARE), counts


def test_matches_sklearn(data, summary):
    y, probs = data
    pred = probs.argmax(1)
    labels = list(range(K))
    close = dict(rtol=0, atol=1e-12)

    assert summary["n"] == N
    np.testing.assert_allclose(summary["accuracy"], skm.accuracy_score(y, pred), **close)
    np.testing.assert_array_equal(
        np.array(summary["confusion_matrix"]), skm.confusion_matrix(y, pred, labels=labels))
    np.testing.assert_array_equal(
        M.confusion_matrix(y, pred, num_classes=K), skm.confusion_matrix(y, pred, labels=labels))

    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, average=avg, zero_division=0)
        got = summary[avg]
        np.testing.assert_allclose([got["precision"], got["recall"], got["f1"]], [p, r, f], **close)

    p, r, f, s = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0)
    pc = summary["per_class"]
    assert [c["class"] for c in pc] == list(M.CLASS_NAMES)
    for key, ref in (("precision", p), ("recall", r), ("f1", f), ("accuracy", r)):
        np.testing.assert_allclose([c[key] for c in pc], ref, **close)
    assert [c["support"] for c in pc] == s.tolist()

    auroc = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    np.testing.assert_allclose(summary["auroc"]["macro"], auroc, **close)
    per_auc = [skm.roc_auc_score(y == k, probs[:, k]) for k in range(K)]
    np.testing.assert_allclose(summary["auroc"]["per_class"], per_auc, **close)

    np.testing.assert_allclose(summary["log_loss"], skm.log_loss(y, probs, labels=labels),
                               rtol=1e-12)


def test_micro_equals_accuracy(summary):
    for key in ("precision", "recall", "f1"):
        assert summary["micro"][key] == pytest.approx(summary["accuracy"], abs=1e-15)


def test_normalized_confusion_matrix(summary):
    cm = np.array(summary["confusion_matrix"], dtype=float)
    norm = np.array(summary["confusion_matrix_normalized"])
    np.testing.assert_allclose(norm, cm / cm.sum(1, keepdims=True), rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.diag(norm), [c["recall"] for c in summary["per_class"]])


def _types_are_plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _types_are_plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_types_are_plain(v) for v in obj)
    return obj is None or type(obj) in (int, float, str, bool)


def test_json_round_trip(summary):
    assert _types_are_plain(summary)
    back = json.loads(json.dumps(summary, allow_nan=False))
    assert back == summary


@pytest.mark.filterwarnings("error")
def test_never_predicted_class_and_empty_class():
    y = np.array([0, 0, 1, 1, 2, 2])
    # class 2 is never predicted; class 3 has no support and is never predicted
    probs = np.array([[.9, .05, .03, .02], [.2, .7, .05, .05], [.1, .8, .05, .05],
                      [.05, .9, .03, .02], [.6, .3, .05, .05], [.3, .6, .05, .05]])
    s = M.classification_summary(y, probs, class_names=["a", "b", "c", "d"])
    pc = {c["class"]: c for c in s["per_class"]}
    assert pc["c"]["precision"] == 0.0 and pc["c"]["recall"] == 0.0 and pc["c"]["f1"] == 0.0
    assert pc["d"]["support"] == 0 and pc["d"]["recall"] == 0.0
    assert s["confusion_matrix_normalized"][3] == [0.0] * 4
    assert s["auroc"]["per_class"][3] is None  # undefined, not NaN
    p, _, _, _ = skm.precision_recall_fscore_support(
        y, probs.argmax(1), labels=[0, 1, 2, 3], average=None, zero_division=0)
    np.testing.assert_allclose([c["precision"] for c in s["per_class"]], p, atol=1e-12)
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("y, probs, match", [
    (np.zeros(3, int), np.full((4, 2), .5), "labels"),
    (np.zeros(0, int), np.zeros((0, 2)), "empty"),
    (np.zeros(2, int), np.array([[np.nan, .5], [.5, .5]]), "NaN"),
    (np.zeros(2, int), np.full(2, .5), "2-D"),
    (np.array([0, 5]), np.full((2, 2), .5), r"\[0, 2\)"),
])
def test_invalid_inputs_raise(y, probs, match):
    with pytest.raises(ValueError, match=match):
        M.classification_summary(y, probs)


def test_class_names_length_checked():
    with pytest.raises(ValueError, match="class names"):
        M.classification_summary([0, 1], np.eye(2), class_names=["only one"])


def test_roc_curves_match_sklearn(data):
    y, probs = data
    curves = M.roc_curves(y, probs)
    assert len(curves) == K
    for k, (fpr, tpr) in enumerate(curves):
        assert fpr[0] == 0.0 and tpr[-1] == 1.0
        np.testing.assert_allclose(np.trapezoid(tpr, fpr), skm.roc_auc_score(y == k, probs[:, k]),
                                   atol=1e-12)


def test_confusion_pairs_order():
    cm = np.array([[5, 3, 0],
                   [1, 8, 4],
                   [3, 0, 2]])
    pairs = M.confusion_pairs(cm)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [
        (1, 2, 4), (0, 1, 3), (2, 0, 3), (1, 0, 1)]  # tie broken row-major
    assert pairs[0]["rate"] == pytest.approx(4 / 13)
    assert pairs[2]["rate"] == pytest.approx(3 / 5)
    assert M.confusion_pairs(cm, top=2) == pairs[:2]


def test_most_confident_mistakes():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([
        [.90, .05, .05],   # right
        [.70, .20, .10],   # wrong, .70
        [.05, .05, .90],   # right
        [.02, .95, .03],   # wrong, .95
        [.10, .30, .60],   # wrong, .60
        [.10, .80, .10],   # wrong, .80
    ])
    idx = M.most_confident_mistakes(y, probs)
    np.testing.assert_array_equal(idx, [3, 5, 1, 4])
    np.testing.assert_array_equal(M.most_confident_mistakes(y, probs, k=2), [3, 5])
    assert M.most_confident_mistakes(y[[0, 2]], probs[[0, 2]]).size == 0


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(1 * 4 * 4, 5))


def test_predict_proba_rows_sum_to_one_and_restores_mode():
    model = _tiny_model()
    x = torch.randn(37, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model.train()
    probs = M.predict_proba(model, x, batch_size=8)
    assert model.training and all(m.training for m in model.modules())
    assert probs.shape == (37, 5) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    torch.testing.assert_close(probs.sum(1), torch.ones(37))
    with torch.no_grad():
        ref = model(x).softmax(1)
    torch.testing.assert_close(probs, ref)
    model.eval()
    M.predict_proba(model, x)
    assert not model.training


def test_predict_proba_tta_identity_equals_plain():
    model = _tiny_model()
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    plain = M.predict_proba(model, x, batch_size=7)
    tta = M.predict_proba(model, x, batch_size=7, tta=2, augment=lambda b, g: b)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)


def test_predict_proba_tta_is_reproducible_and_uses_augment():
    model = _tiny_model()
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(3))

    def noisy(b, g):
        return b + torch.randn(b.shape, generator=g, device=b.device)

    a = M.predict_proba(model, x, batch_size=7, tta=3, augment=noisy)
    b = M.predict_proba(model, x, batch_size=7, tta=3, augment=noisy)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, M.predict_proba(model, x))
    with pytest.raises(ValueError, match="augment"):
        M.predict_proba(model, x, tta=1)


def test_latency_and_throughput_positive_and_restore_mode():
    model = _tiny_model()
    model.train()
    lat = M.measure_latency(model, image_shape=(1, 4, 4), repeats=3, warmup=1)
    thr = M.measure_throughput(model, image_shape=(1, 4, 4), batch_size=16, repeats=3)
    for v in (lat, thr):
        assert isinstance(v, float) and math.isfinite(v) and v > 0
    assert model.training
