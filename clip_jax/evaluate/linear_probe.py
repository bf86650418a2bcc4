"""Linear-probe evaluation, the CLIP way (Radford et al. 2021, appendix A.3).

L2-regularized multinomial logistic regression on frozen image features, fitted by L-BFGS
(optax) to the objective of scikit-learn's LogisticRegression(C=C):

    C * sum_i cross_entropy_i + 0.5 * ||W||^2        (the intercept is not penalized)

The regularization strength C is chosen by the paper's parametric binary search over
log10(C) on a validation split, then the classifier is refit on train + validation and
scored on test:

    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
    result["top1"], result["C"]
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.evaluate.zero_shot import per_class_accuracy, topk_accuracy

# Iterations in a row without progress (see _lbfgs) after which the solver stops: in float32
# the gradient may not reach a tight tol, and a failed linesearch in optax still takes a
# step, so the solver keeps the best iterate rather than the last.
STALL_ITERATIONS = 10
# Relative change of a float32 objective below which two values count as equal (a few ulps).
VALUE_RTOL = 4 * float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------- validation


def _check_features(name: str, features) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [examples, dims], got shape {x.shape}: "
                         "flatten or stack the embeddings into one row per example")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): every split needs at least one example")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} has non-finite values (NaN or inf; first at row {bad[0]}, column {bad[1]}): "
                         "drop or recompute those examples")
    return x


def _check_labels(name: str, labels, rows: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D [examples] of class indices, got shape {y.shape}")
    if y.shape[0] != rows:
        raise ValueError(f"{name} has {y.shape[0]} labels but the features have {rows} rows: "
                         "pass one label per feature row")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0):
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} has labels outside [0, num_classes={num_classes}): min {y.min()}, max {y.max()}; "
                         "map the labels to 0..num_classes-1 or raise num_classes")
    return y.astype(np.int32)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- the solver


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _lbfgs(x, y, mean, scale, l2, max_iter, tol, *, num_classes: int):
    """Minimizes mean CE + l2/2 ||W||^2 over (V, c), with W = scale * V and x centered.

    The change of variables is a diagonal preconditioner: the objective and its minimizer are
    the same as in raw coordinates, only the path of L-BFGS changes.
    """
    xc = x - mean  # centering decouples the intercept from the weights

    def value_fn(params):
        # HIGHEST: TPUs (bf16 passes) and GPUs (TF32) otherwise round f32 matmuls to ~3 digits.
        logits = jnp.matmul(xc, scale[:, None] * params["v"], precision=jax.lax.Precision.HIGHEST) + params["c"]
        true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - true)
        return ce + 0.5 * l2 * jnp.sum((scale[:, None] * params["v"]) ** 2)

    def raw_grad_max(grad):
        # Gradient w.r.t. the raw (W, b) of logits = x @ W + b: W = scale * V, b = c - mean @ W,
        # so d/dW = d/dV / scale + mean * d/dc. sklearn stops on this max-abs gradient.
        gw = grad["v"] / scale[:, None] + mean[:, None] * grad["c"][None, :]
        return jnp.maximum(jnp.max(jnp.abs(gw)), jnp.max(jnp.abs(grad["c"])))

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)
    params = {"v": jnp.zeros((x.shape[1], num_classes), x.dtype), "c": jnp.zeros((num_classes,), x.dtype)}
    value, grad = jax.value_and_grad(value_fn)(params)

    def cond(carry):
        _, _, it, _, _, best_gmax, stall = carry
        return (it < max_iter) & (best_gmax > tol) & (stall < STALL_ITERATIONS)

    def body(carry):
        params, state, it, best, best_value, best_gmax, stall = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        params = optax.apply_updates(params, updates)
        # The linesearch leaves the value and gradient at the new params in the state.
        new_value = optax.tree.get(state, "value")
        new_gmax = raw_grad_max(optax.tree.get(state, "grad"))
        # Near the optimum float32 values stop resolving the decrease (the linesearch then
        # relies on slopes), so an iterate whose value ties the best within rounding but has
        # a smaller gradient is progress too. Comparisons with NaN are False.
        ties = new_value <= best_value + VALUE_RTOL * jnp.abs(best_value)
        better = (new_value < best_value) | (ties & (new_gmax < best_gmax))
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        return (params, state, it + 1, best,
                jnp.where(better, new_value, best_value), jnp.where(better, new_gmax, best_gmax),
                jnp.where(better, jnp.int32(0), stall + 1))

    zero = jnp.zeros((), jnp.int32)  # explicit dtypes: while_loop needs the carry's types fixed
    init = (params, solver.init(params), zero, params, value, raw_grad_max(grad), zero)
    _, _, it, best, best_value, best_gmax, _ = jax.lax.while_loop(cond, body, init)
    return best, it, best_gmax, best_value


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int, C: float,
                            max_iter: int = 1000, tol: float = 1e-6) -> dict:
    """Multinomial logistic regression with scikit-learn's objective, solved by optax L-BFGS.

    Minimizes C * sum_i CE_i + ||W||^2 / 2 (intercept unpenalized), internally divided by C*N
    as scikit-learn does; stops after max_iter iterations or when the max-abs gradient of that
    scaled objective is <= tol. Returns {"weights" [d, K], "bias" [K], "iterations",
    "grad_norm" (that max-abs gradient), "objective" (on scikit-learn's scale)}.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    max_iter = _check_int("max_iter", max_iter, 0)
    x = _check_features("features", features)
    y = _check_labels("labels", labels, x.shape[0], num_classes)
    if not (isinstance(C, (int, float, np.floating, np.integer)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite positive number, got {C!r}")
    if not (isinstance(tol, (int, float, np.floating, np.integer)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    n = x.shape[0]
    l2 = 1.0 / (C * n)
    mean = x.mean(axis=0, dtype=np.float64)  # float64 statistics without a float64 copy of x
    std = x.std(axis=0, dtype=np.float64)
    # Jacobi-like scaling: a feature's diagonal Hessian is ~ std^2/K (data) + l2 (penalty);
    # scaling its weight by 1/sqrt(std^2 + K*l2) makes all diagonals ~1/K whichever term wins.
    scale = 1.0 / np.sqrt(std**2 + num_classes * l2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    best, it, gmax, value = _lbfgs(f32(x), jnp.asarray(y), f32(mean), f32(scale), f32(l2),
                                   jnp.asarray(max_iter, jnp.int32), f32(tol), num_classes=num_classes)
    weights = scale[:, None] * np.asarray(best["v"], np.float64)
    bias = np.asarray(best["c"], np.float64) - mean @ weights
    # Softmax is invariant to a shift of all intercepts; report the zero-mean one.
    bias -= bias.mean()
    return {"weights": weights.astype(np.float32), "bias": bias.astype(np.float32), "iterations": int(it),
            "grad_norm": float(gmax), "objective": float(value) * C * n}


def predict_logits(result: dict, features: np.ndarray) -> np.ndarray:
    """Logits [N, K] of a fitted classifier (from fit_logistic_regression) on raw features."""
    x = _check_features("features", features)
    w = result["weights"]
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"features have {x.shape[1]} dims but the classifier was fit on {w.shape[0]}")
    return x.astype(np.float32) @ w + result["bias"]


# ---------------------------------------------------------------------------- the C sweep


def sweep_regularization(score: Callable[[float], float], low: float = -6.0, high: float = 6.0,
                         steps_per_decade: int = 8) -> tuple[float, dict[float, float]]:
    """The paper's parametric binary search for the C that maximizes score(C).

    Evaluates C = 10^low, 10^(low+2), ..., 10^high, then repeatedly halves the step and
    evaluates the two points one step either side of the best so far, until the step is
    1/steps_per_decade decade. Ties (and NaN scores, which rank last) go to the smaller C,
    i.e. the stronger regularization. Returns (best C, {C: score of every C evaluated}).
    """
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"need finite low <= high (log10 C), got low={low}, high={high}")
    steps_per_decade = _check_int("steps_per_decade", steps_per_decade, 1)
    scores: dict[float, float] = {}  # log10 C -> score

    def evaluate(log_c: float) -> None:
        log_c = round(log_c, 9)  # one key for the same point reached by different sums
        if low - 1e-9 <= log_c <= high + 1e-9 and log_c not in scores:
            value = float(score(10.0**log_c))
            scores[log_c] = value if not math.isnan(value) else -math.inf

    def best() -> float:
        return max(scores, key=lambda log_c: (scores[log_c], -log_c))

    # A uniform starting grid at most 2 decades apart (exactly 2 for the paper's [-6, 6]).
    intervals = max(1, math.ceil((high - low) / 2 - 1e-9))
    step = (high - low) / intervals
    for i in range(intervals + 1):
        evaluate(low + i * step)
    resolution = 1.0 / steps_per_decade
    while step > resolution + 1e-9:
        step /= 2
        center = best()
        evaluate(center - step)
        evaluate(center + step)
    top = best()
    return 10.0**top, {10.0**log_c: s for log_c, s in scores.items()}


# ---------------------------------------------------------------------------- the protocol


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, num_classes: int, val_features: np.ndarray | None = None,
                 val_labels: np.ndarray | None = None, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000) -> dict:
    """The paper's linear probe: sweep C on validation, refit on train + validation, test.

    Without an explicit validation split a seeded random val_fraction of train is held out.
    Returns {"C", "val_top1", "top1", "top5" (num_classes >= 5), "mean_per_class" (mean
    top-1 over the classes present in test), "sweep": {str(C): validation top-1}}.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    max_iter = _check_int("max_iter", max_iter, 1)
    train_x = _check_features("train_features", train_features)
    train_y = _check_labels("train_labels", train_labels, train_x.shape[0], num_classes)
    test_x = _check_features("test_features", test_features)
    test_y = _check_labels("test_labels", test_labels, test_x.shape[0], num_classes)
    if (val_features is None) != (val_labels is None):
        raise ValueError("pass both val_features and val_labels, or neither (then val_fraction of train is held out)")
    if val_features is not None:
        val_x = _check_features("val_features", val_features)
        val_y = _check_labels("val_labels", val_labels, val_x.shape[0], num_classes)
        fit_x, fit_y = train_x, train_y
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(round(val_fraction * train_x.shape[0]))
        if not 1 <= n_val < train_x.shape[0]:
            raise ValueError(f"val_fraction={val_fraction} of {train_x.shape[0]} training examples leaves an empty "
                             "train or validation split: pass more training examples or an explicit validation split")
        order = np.random.default_rng(seed).permutation(train_x.shape[0])
        val_x, val_y = train_x[order[:n_val]], train_y[order[:n_val]]
        fit_x, fit_y = train_x[order[n_val:]], train_y[order[n_val:]]
    dims = {"train_features": train_x.shape[1], "val_features": val_x.shape[1], "test_features": test_x.shape[1]}
    if len(set(dims.values())) != 1:
        raise ValueError(f"feature dims differ between splits: {dims}; embed every split with the same model")

    def val_top1(C: float) -> float:
        fit = fit_logistic_regression(fit_x, fit_y, num_classes, C, max_iter=max_iter)
        return topk_accuracy(predict_logits(fit, val_x), val_y, ks=(1,))["top1"]

    best_c, sweep = sweep_regularization(val_top1)
    final = fit_logistic_regression(np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y]), num_classes,
                                    best_c, max_iter=max_iter)
    logits = predict_logits(final, test_x)
    result = {"C": best_c, "val_top1": sweep[best_c]}
    result.update(topk_accuracy(logits, test_y, ks=(1, 5) if num_classes >= 5 else (1,)))
    result["mean_per_class"] = float(np.nanmean(per_class_accuracy(logits, test_y)))  # NaN: class absent from test
    result["sweep"] = {str(c): s for c, s in sweep.items()}
    return result
