"""Classification metrics of the task evaluation (evaluation.md): accuracy, macro-F1, the majority-class
baseline and a percentile bootstrap interval over examples, all deterministic for a given seed."""

from __future__ import annotations

from collections import Counter

import numpy as np


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(gold == pred))


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean F1 over the labels that occur in gold or prediction (a label in neither has no defined F1)."""
    scores = []
    for label in np.union1d(gold, pred):
        tp = np.sum((pred == label) & (gold == label))
        fp = np.sum((pred == label) & (gold != label))
        fn = np.sum((pred != label) & (gold == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def bootstrap_ci(
    gold: np.ndarray, pred: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile interval of accuracy and macro-F1 over `resamples` resamples of the examples (with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(gold), size=(resamples, len(gold)))
    acc = np.array([accuracy(gold[d], pred[d]) for d in draws])
    f1 = np.array([macro_f1(gold[d], pred[d]) for d in draws])
    tail = 100 * (1 - level) / 2
    return {
        "accuracy": [float(v) for v in np.percentile(acc, [tail, 100 - tail])],
        "macro_f1": [float(v) for v in np.percentile(f1, [tail, 100 - tail])],
    }


def classification_report(
    gold: list[str], pred: list[str], resamples: int = 1000, seed: int = 0
) -> dict[str, float | int | str | dict]:
    """Accuracy, macro-F1, their 95% bootstrap intervals, and the majority-class baseline on the same examples."""
    g, p = np.array(gold), np.array(pred)
    majority, _ = Counter(gold).most_common(1)[0]
    always = np.full_like(g, majority)
    return {
        "n": len(gold),
        "accuracy": accuracy(g, p),
        "macro_f1": macro_f1(g, p),
        "ci95": bootstrap_ci(g, p, resamples, seed),
        "majority_label": majority,
        "majority_accuracy": accuracy(g, always),
        "majority_macro_f1": macro_f1(g, always),
        "gold_counts": dict(sorted(Counter(gold).items())),
        "pred_counts": dict(sorted(Counter(pred).items())),
    }
