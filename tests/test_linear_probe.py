"""Linear probe: the L-BFGS fit against scikit-learn, the C sweep against known score curves,
the protocol against Bayes-optimal and scikit-learn references.

Every fit here has 5 classes, 16 dims and 120, 480 or 600 rows, so the whole file compiles
the solver three times.
"""

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from clip_jax.evaluate.linear_probe import fit_logistic_regression, linear_probe, predict_logits, sweep_regularization

K, D = 5, 16
# Overlapping unit-variance clusters (Bayes accuracy ~0.85): not separable, so every C has a
# well-defined optimum; the offset makes the intercept matter.
CENTERS = 0.6 * np.random.default_rng(0).standard_normal((K, D)) + 2.0


def clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return (CENTERS[y] + rng.standard_normal((n, D))).astype(np.float32), y


def bayes_predict(x: np.ndarray) -> np.ndarray:
    """Equal priors, identity covariance: the nearest true center is the Bayes decision."""
    return np.argmin(((x[:, None, :] - CENTERS[None]) ** 2).sum(-1), axis=1)


def sklearn_objective_and_grad(w, b, x, y, C):
    """C * sum_i CE_i + ||W||^2 / 2 and its gradient (dW, db), float64 numpy."""
    x, w, b = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(b, np.float64)
    z = x @ w + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    value = C * -np.log(p[rows, y]).sum() + 0.5 * np.sum(w**2)
    p[rows, y] -= 1.0
    return value, (C * x.T @ p + w, C * p.sum(axis=0))


def fit_sklearn(x, y, C):
    return LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(np.asarray(x, np.float64), y)


@pytest.mark.parametrize("C", [1e-2, 1.0, 100.0])
def test_fit_matches_sklearn(C):
    x, y = clusters(480, seed=1)
    ours = fit_logistic_regression(x, y, K, C)
    ref = fit_sklearn(x, y, C)
    assert ref.score(x, y) < 0.95  # not separable

    ours_value, _ = sklearn_objective_and_grad(ours["weights"], ours["bias"], x, y, C)
    ref_value, _ = sklearn_objective_and_grad(ref.coef_.T, ref.intercept_, x, y, C)
    assert abs(ours_value - ref_value) <= 1e-5 * ref_value  # measured: <= 1e-9
    assert ours["objective"] == pytest.approx(ours_value, rel=1e-5)
    assert ours["grad_norm"] <= 1e-6 and 0 < ours["iterations"] < 1000

    # Measured: <= 3e-5 of the largest |W| (float32 vs sklearn's float64).
    np.testing.assert_allclose(ours["weights"], ref.coef_.T, rtol=0, atol=1e-3 * np.abs(ref.coef_).max())
    # Softmax ignores a common shift of the intercepts: compare zero-mean ones.
    ref_bias = ref.intercept_ - ref.intercept_.mean()
    np.testing.assert_allclose(ours["bias"], ref_bias, rtol=0, atol=1e-3 * np.abs(ref_bias).max() + 1e-4)
    agree = np.mean(predict_logits(ours, x).argmax(1) == ref.predict(x))
    assert agree >= 0.99


def test_solution_is_stationary():
    x, y = clusters(480, seed=4)
    C = 3.0
    ours = fit_logistic_regression(x, y, K, C)
    _, (gw, gb) = sklearn_objective_and_grad(ours["weights"], ours["bias"], x, y, C)
    _, (gw0, gb0) = sklearn_objective_and_grad(np.zeros((D, K)), np.zeros(K), x, y, C)
    at_solution = max(np.abs(gw).max(), np.abs(gb).max())
    at_zero = max(np.abs(gw0).max(), np.abs(gb0).max())
    assert at_solution <= 1e-4 * at_zero  # measured: 3.5e-6
    # The reported grad_norm is sklearn's stopping quantity: this gradient over C * N.
    assert at_solution / (C * len(y)) <= 1e-5

    # max_iter is honoured, and a truncated run is visibly not converged.
    early = fit_logistic_regression(x, y, K, C, max_iter=2)
    assert early["iterations"] == 2 and early["grad_norm"] > 1e-3
    assert early["objective"] > ours["objective"]


def test_class_absent_from_training_is_never_predicted():
    # Its unpenalized intercept runs off to -inf; the fit must still stop, on a finite answer.
    x, y = clusters(480, seed=1)
    keep = y != K - 1
    fit = fit_logistic_regression(x[keep], y[keep], K, C=1.0)
    logits = predict_logits(fit, x)
    assert np.all(np.isfinite(logits)) and fit["iterations"] < 1000 and fit["grad_norm"] < 1e-5
    assert not np.any(logits.argmax(1) == K - 1)
    ref = fit_sklearn(x[keep], y[keep], C=1.0)  # fits only the 4 classes present
    assert np.mean(logits.argmax(1) == ref.predict(x)) >= 0.99


@pytest.mark.parametrize("peak", [-6.0, 6.0, -3.3, -4.62, 0.06, 1.44, 2.9, 4.03, 5.95, -5.99])
@pytest.mark.parametrize("shape", ["quadratic", "abs"])
def test_sweep_finds_peak_of_unimodal_score(peak, shape):
    calls = []

    def score(C):
        calls.append(C)
        t = math.log10(C) - peak
        return -(t**2) if shape == "quadratic" else -abs(t)

    best, evaluated = sweep_regularization(score)
    assert abs(math.log10(best) - min(max(peak, -6.0), 6.0)) <= 1 / 8 + 1e-9
    assert len(calls) == len(set(calls)) == len(evaluated) <= 15  # cached; full grid: 97
    assert all(1e-6 * (1 - 1e-9) <= C <= 1e6 * (1 + 1e-9) for C in evaluated)
    assert 1e-6 in evaluated and 1e6 in evaluated and 1.0 in evaluated  # the paper's grid
    assert evaluated[best] == max(evaluated.values())
    for C, value in evaluated.items():
        assert value == score(C)


def test_sweep_ties_go_to_smaller_C():
    best, evaluated = sweep_regularization(lambda C: 0.5)
    assert best == 1e-6 and len(evaluated) < 15

    # A plateau over log10 C in [-1.3, 0.7]: the smallest C found on it, within 1/8 decade of its edge.
    best, evaluated = sweep_regularization(lambda C: 1.0 if -1.3 <= math.log10(C) <= 0.7 else 0.0)
    assert -1.3 <= math.log10(best) <= -1.3 + 1 / 8
    assert best == min(C for C, s in evaluated.items() if s == 1.0)

    # A coarser search stops earlier.
    best, evaluated = sweep_regularization(lambda C: -abs(math.log10(C) - 1.3), steps_per_decade=2)
    assert abs(math.log10(best) - 1.3) <= 1 / 2 and len(evaluated) <= 11


def test_linear_probe_held_out_validation_near_bayes():
    train_x, train_y = clusters(600, seed=2)
    test_x, test_y = clusters(2000, seed=3)
    bayes = np.mean(bayes_predict(test_x) == test_y)
    result = linear_probe(train_x, train_y, test_x, test_y, K)

    assert bayes - 0.05 <= result["top1"] <= bayes + 0.02
    assert result["top5"] == 1.0  # 5 classes
    assert abs(result["mean_per_class"] - result["top1"]) < 0.05  # balanced classes
    sweep = {float(c): s for c, s in result["sweep"].items()}
    assert all(1e-6 * (1 - 1e-9) <= c <= 1e6 * (1 + 1e-9) for c in sweep) and len(sweep) <= 15
    assert result["val_top1"] == max(sweep.values()) == sweep[result["C"]]
    assert result["C"] == min(c for c, s in sweep.items() if s == result["val_top1"])
    assert all(s * 120 == pytest.approx(round(s * 120)) for s in sweep.values())  # 20% of 600 held out


def test_linear_probe_explicit_validation_matches_sklearn():
    # A small train and a large validation split: the refit on both is clearly better than
    # a fit on train alone, so the test tells them apart.
    train_x, train_y = clusters(120, seed=5)
    val_x, val_y = clusters(480, seed=6)
    test_x, test_y = clusters(1000, seed=7)
    result = linear_probe(train_x, train_y, test_x, test_y, K, val_features=val_x, val_labels=val_y)
    C = result["C"]

    # The sweep scored on the given split: sklearn at the chosen C, trained on train alone.
    ref_val = fit_sklearn(train_x, train_y, C).score(val_x, val_y)
    assert abs(result["val_top1"] - ref_val) <= 2 / 480 + 1e-9
    # The reported numbers are those of a refit on train + validation.
    ref = fit_sklearn(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), C)
    pred = ref.predict(test_x)
    assert abs(result["top1"] - np.mean(pred == test_y)) <= 0.003
    per_class = [np.mean(pred[test_y == c] == c) for c in range(K)]
    assert abs(result["mean_per_class"] - np.mean(per_class)) <= 0.003
    alone = fit_sklearn(train_x, train_y, C).score(test_x, test_y)
    assert result["top1"] - alone > 0.01  # measured: 0.822 vs 0.799, so the 0.003 above tells them apart
    bayes = np.mean(bayes_predict(test_x) == test_y)
    assert result["top1"] >= bayes - 0.05

    # Validation labels that carry no information give a chance-level sweep.
    shuffled = np.random.default_rng(8).permutation(val_y)
    noise = linear_probe(train_x, train_y, test_x, test_y, K, val_features=val_x, val_labels=shuffled)
    assert noise["val_top1"] < result["val_top1"] - 0.3


def test_bad_inputs_name_the_problem():
    x, y = clusters(40, seed=9)
    tx, ty = clusters(20, seed=10)
    cases = [
        (dict(train_features=x[:, 0]), "train_features must be 2-D"),
        (dict(test_features=tx[:, :8]), "feature dims differ between splits"),
        (dict(val_features=x[:10, :8], val_labels=y[:10]), "feature dims differ between splits"),
        (dict(train_labels=y[:-1]), "39 labels but the features have 40 rows"),
        (dict(test_labels=np.where(ty == 0, K, ty)), r"outside \[0, num_classes=5\)"),
        (dict(train_labels=np.where(y == 0, -1, y)), r"outside \[0, num_classes=5\)"),
        (dict(train_labels=y + 0.5), "integer class indices"),
        (dict(test_features=tx[:0], test_labels=ty[:0]), "test_features is empty"),
        (dict(val_features=x[:0], val_labels=y[:0]), "val_features is empty"),
        (dict(train_features=np.where(np.arange(D) == 3, np.nan, x)), "non-finite"),
        (dict(test_features=np.where(np.arange(D) == 3, np.inf, tx)), "test_features has non-finite"),
        (dict(val_features=x[:10]), "both val_features and val_labels"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(num_classes=1), "num_classes must be an integer >= 2"),
    ]
    for change, message in cases:
        kwargs = dict(train_features=x, train_labels=y, test_features=tx, test_labels=ty, num_classes=K)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            linear_probe(**kwargs)

    with pytest.raises(ValueError, match="C must be a finite positive number"):
        fit_logistic_regression(x, y, K, C=0.0)
    with pytest.raises(ValueError, match="labels has 39 labels"):
        fit_logistic_regression(x, y[:-1], K, C=1.0)
    with pytest.raises(ValueError, match="features have 8 dims but the classifier was fit on 16"):
        predict_logits({"weights": np.zeros((D, K), np.float32), "bias": np.zeros(K, np.float32)}, x[:, :8])
