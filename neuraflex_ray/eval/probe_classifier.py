"""The probes' classifier, the same for the embedding and for the baseline's features.

Median imputation (a window with too few R-peaks has no heart rate) + StandardScaler +
LogisticRegression(class_weight="balanced", C fixed): C is not tuned, since time-ordered folds of
a recording's train side are long single-class stretches and a CV score would say little; a fixed
C on standardised features treats both feature sets alike. Scored by balanced accuracy (chance 1 /
the number of classes whatever their counts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from neuraflex_ray.eval.probe_tasks import TaskWindows

C = 1.0  # inverse L2 strength of the logistic regression, fixed
N_BOOT = 2000  # bootstrap draws of every interval


def fit_classifier(x_train: np.ndarray, y_train: np.ndarray, c: float = C) -> Pipeline:
    """The one pipeline both feature sets get; it only ever sees train rows."""
    clf = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                        LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
    return clf.fit(x_train, y_train)


def score(clf: Pipeline, x_test: np.ndarray, y_test: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    pred = clf.predict(x_test)
    recall = recall_score(y_test, pred, labels=list(range(len(classes))), average=None, zero_division=0.0)
    return {"bacc": float(balanced_accuracy_score(y_test, pred)), "recall": dict(zip(classes, map(float, recall), strict=True))}


def decode(features: dict[str, np.ndarray], task: TaskWindows, c: float = C) -> dict[str, Any]:
    """features: side -> [W, F] rows in task.starts[side] order; fit on train, score on test."""
    clf = fit_classifier(features["train"], task.y["train"], c)
    return {**score(clf, features["test"], task.y["test"], task.classes), "classifier": clf,
            "pred": clf.predict(features["test"])}


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, classes: int = 2) -> float:
    """Balanced accuracy; a ValueError when a class is missing from y (a resample it cannot score)."""
    if len(np.unique(y)) < classes:
        raise ValueError("a class is missing")
    return float(balanced_accuracy_score(y, pred))
