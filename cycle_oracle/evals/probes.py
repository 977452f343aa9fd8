"""Probe comparisons: how much of what a linear probe reads from v survives in the description?

For each binary task (evals/data.py) and each read position (`last` token, `mean` over tokens),
on a stratified train/test split by item (each text is its own document):

- probe:          logistic regression on raw activations v (standardised; sklearn, fixed seed);
- decoder:        d = describe(v); TF-IDF (word 1-2 grams) + logistic regression trained on the
                  training split's descriptions, tested on the test split's descriptions;
- judge:          (optional) the target model reads d and answers the task's yes/no question;
                  score = logit(Yes) - logit(No), threshold chosen on the training split;
- reconstruction: the probe above applied to encode(d) (does the reconstruction keep the
                  probe's direction?);
- oracle:         ask_yes_no(v, question) directly, threshold t chosen on the training split
                  (predict 1 iff score > t); `oracle_raw` is the same at t = 0 (Yes beats No);
- majority:       the training split's majority class predicted for every test item.

An oracle without an encoder (`encode` None) skips `reconstruction`, one that cannot answer
questions about v (`ask_yes_no` None: logit lens, Patchscopes, LatentLens) skips `oracle`; the
task's `skipped_routes` says which and why.

Every accuracy comes with its 95% Wilson score interval: for k correct out of n, p = k/n, z = 1.96,

    centre = (p + z^2/(2n)) / (1 + z^2/n),   half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cycle_oracle.evals.controls import text_controls
from cycle_oracle.evals.data import BinaryTask, split_items
from cycle_oracle.evals.oracle import describe_items

Z95 = 1.959963984540054
ROUTES = ("probe", "decoder", "reconstruction", "oracle")


# ---- pure maths ---------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion correct/n (see module docstring)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the interval always holds p; at p = 0 or 1 the bound equals p up to float rounding, which must not cross it
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def accuracy_block(predictions: Sequence[int], labels: Sequence[int]) -> dict:
    """{accuracy, ci_low, ci_high, correct, n} of 0/1 predictions against 0/1 labels."""
    pred, y = np.asarray(predictions).astype(int), np.asarray(labels).astype(int)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.shape} predictions for {y.shape} labels")
    correct, n = int((pred == y).sum()), int(len(y))
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "correct": correct, "n": n}


def best_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Threshold t maximising training accuracy of (score > t). Candidates: midpoints between
    consecutive distinct scores, and one value below / above all scores. Among equally good
    candidates the middle one is taken."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(int)
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    accs = np.array([((s > t).astype(int) == y).mean() for t in cands])
    best = np.flatnonzero(accs == accs.max())
    return float(cands[best[len(best) // 2]])


def majority_label(labels: Sequence[int]) -> int:
    y = np.asarray(labels).astype(int)
    return int(y.sum() * 2 > len(y))  # ties -> 0


# ---- classifiers ---------------------------------------------------------------------------

def fit_vector_probe(x: torch.Tensor, y: Sequence[int], seed: int = 0, c: float = 1.0):
    """Standardise + L2 logistic regression on vectors [N, d]."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn: only the probe evals need it
    from sklearn.pipeline import make_pipeline  # scikit-learn: only the probe evals need it
    from sklearn.preprocessing import StandardScaler  # scikit-learn: only the probe evals need it

    if len(set(int(t) for t in y)) < 2:
        raise ValueError("a probe needs both classes in its training split")
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed)).fit(x.float().numpy(), np.asarray(y))


class _Constant:
    def __init__(self, label: int):
        self.label = label

    def predict(self, xs):
        return np.full(len(xs), self.label)


def fit_text_classifier(texts: Sequence[str], y: Sequence[int], seed: int = 0):
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression; the training majority class
    when the descriptions have no usable vocabulary (e.g. all empty)."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # scikit-learn: only the probe evals need it
    from sklearn.linear_model import LogisticRegression  # scikit-learn: only the probe evals need it
    from sklearn.pipeline import make_pipeline  # scikit-learn: only the probe evals need it

    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=5000, random_state=seed))
    try:
        return pipe.fit(list(texts), np.asarray(y))
    except ValueError:  # empty vocabulary
        return _Constant(majority_label(y))


def _threshold_route(train_scores: torch.Tensor, y_train, test_scores: torch.Tensor, y_test) -> tuple[dict, dict]:
    t = best_threshold(train_scores.tolist(), y_train)
    block = accuracy_block((test_scores.numpy() > t).astype(int), y_test) | {"threshold": t}
    raw = accuracy_block((test_scores.numpy() > 0).astype(int), y_test) | {"threshold": 0.0}
    return block, raw


# ---- the eval -----------------------------------------------------------------------------

def evaluate_task(
    oracle,
    task: BinaryTask,
    positions: Sequence[str] = ("last", "mean"),
    routes: Sequence[str] = ROUTES,
    judge: bool = False,
    test_fraction: float = 0.5,
    seed: int = 0,
    examples: int = 3,
) -> dict:
    """Accuracy (+ Wilson interval) of every route on one task, per read position."""
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise ValueError(f"unknown probe route(s) {sorted(unknown)}; expected a subset of {ROUTES}")
    if judge and oracle.judge_yes_no is None:
        raise ValueError("judge=True but this oracle has no judge_yes_no")
    skipped = {}
    if "reconstruction" in routes and oracle.encode is None:
        skipped["reconstruction"] = "the oracle has no encoder"
    if "oracle" in routes and oracle.ask_yes_no is None:
        skipped["oracle"] = "the oracle cannot answer questions about v"
    routes = [r for r in routes if r not in skipped]
    train, test = split_items(task.items, test_fraction, seed)
    y_train, y_test = [x.label for x in train], [x.label for x in test]
    out = {
        "task": task.name,
        "question": task.question,
        "source": task.source,
        "n_train": len(train),
        "n_test": len(test),
        "majority": accuracy_block([majority_label(y_train)] * len(test), y_test),
        "positions": {},
    }
    if skipped:
        out["skipped_routes"] = skipped
    need_descriptions = bool({"decoder", "reconstruction"} & set(routes)) or judge
    for pos in positions:
        x_train = oracle.read([x.text for x in train], pos)
        x_test = oracle.read([x.text for x in test], pos)
        res: dict = {}
        probe = fit_vector_probe(x_train, y_train, seed) if {"probe", "reconstruction"} & set(routes) else None
        if "probe" in routes:
            res["probe"] = accuracy_block(probe.predict(x_test.numpy()), y_test)
        if need_descriptions:
            d_train = describe_items(oracle, x_train, [x.text for x in train])
            d_test = describe_items(oracle, x_test, [x.text for x in test])
            if "decoder" in routes:
                res["decoder"] = accuracy_block(fit_text_classifier(d_train, y_train, seed).predict(d_test), y_test)
            if "reconstruction" in routes:
                res["reconstruction"] = accuracy_block(probe.predict(oracle.encode(d_test).numpy()), y_test)
            if judge:
                res["judge"], res["judge_raw"] = _threshold_route(
                    oracle.judge_yes_no(d_train, task.question), y_train, oracle.judge_yes_no(d_test, task.question), y_test)
            res["text_controls"] = text_controls(d_test, [x.text for x in test])
            res["examples"] = [{"text": x.text, "label": x.label, "description": d} for x, d in list(zip(test, d_test))[:examples]]
        if "oracle" in routes:
            res["oracle"], res["oracle_raw"] = _threshold_route(
                oracle.ask_yes_no(x_train, task.question), y_train, oracle.ask_yes_no(x_test, task.question), y_test)
        out["positions"][pos] = res
    return out
