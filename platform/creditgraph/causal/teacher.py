"""The distillation teacher: a K-fold cross-fitted LightGBM classifier.

Every training row's soft label comes from the fold model that did not see that row
(``oof_proba_``); a final model refitted on all training rows scores everyone else and provides
the GBDT leaf encoding (seed 001's GBDT+GNN input). Missing values stay NaN: LightGBM learns a
default direction per split, nothing is imputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from creditgraph.utils.io import atomic_file, read_json, write_json

#: LightGBM settings of the teacher unless ``params`` are given: shallow, regularized trees with
#: row and column subsampling (a teacher that fits noise passes it on to every alpha_j).
DEFAULT_PARAMS: dict[str, Any] = {
    "n_estimators": 500,
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_child_samples": 50,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
}


class Teacher(ClassifierMixin, BaseEstimator):
    """K-fold cross-fitted LightGBM teacher (a scikit-learn classifier).

    Parameters
    ----------
    n_folds: cross-fitting folds.
    params: ``lightgbm.LGBMClassifier`` keyword arguments (``None``: :data:`DEFAULT_PARAMS`).
    n_jobs: LightGBM threads.
    early_stopping: if set, each fold model stops when the log-loss on a held-out tenth of its
        training part has not improved for this many rounds; the final model then uses the
        fold models' mean best number of trees. Guards the soft labels against overfitting.
    random_state: seeds the fold split and every booster.

    Attributes
    ----------
    oof_proba_: out-of-fold p(y = 1) of every training row; ``fold_``: its fold;
    oof_auc_: AUC of ``oof_proba_``; ``final_model_``: the booster refitted on all rows;
    ``classes_``: ``[0, 1]``.
    """

    def __init__(
        self,
        n_folds: int = 5,
        params: dict[str, Any] | None = None,
        n_jobs: int = 2,
        early_stopping: int | None = 50,
        random_state: int = 0,
    ) -> None:
        self.n_folds = n_folds
        self.params = params
        self.n_jobs = n_jobs
        self.early_stopping = early_stopping
        self.random_state = random_state

    def _classifier(self, seed: int, **override: Any) -> lgb.LGBMClassifier:
        params = {"verbose": -1, **(DEFAULT_PARAMS if self.params is None else self.params)}
        params.update(override)
        return lgb.LGBMClassifier(
            random_state=seed, n_jobs=self.n_jobs, deterministic=True, **params
        )

    def _fit_fold(self, X: np.ndarray, y: np.ndarray, seed: int) -> lgb.LGBMClassifier:
        if not self.early_stopping:
            return self._classifier(seed).fit(X, y)
        fit, stop = train_test_split(
            np.arange(len(y)), test_size=0.1, stratify=y, random_state=seed
        )
        return self._classifier(seed).fit(
            X[fit],
            y[fit],
            eval_X=X[stop],
            eval_y=y[stop],
            callbacks=[lgb.early_stopping(self.early_stopping, verbose=False)],
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> Teacher:
        """Fit fold models (for ``oof_proba_``, ``fold_``) and a final model on all rows."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X {X.shape} and y {y.shape} do not match")
        if y.dtype.kind == "f" and np.isnan(y).any():
            raise ValueError("y has missing labels; pass labeled rows only")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError("y must contain both classes 0 and 1 and nothing else")
        y = y.astype(np.int32)
        seed = self.random_state
        folds = StratifiedKFold(self.n_folds, shuffle=True, random_state=seed)
        self.fold_ = np.full(len(y), -1, dtype=np.int16)
        self.oof_proba_ = np.full(len(y), np.nan)
        self.models_: list[lgb.Booster] = []
        best: list[int] = []
        for k, (tr, te) in enumerate(folds.split(X, y)):
            clf = self._fit_fold(X[tr], y[tr], seed + 1 + k)
            self.oof_proba_[te] = clf.predict_proba(X[te])[:, 1]
            self.fold_[te] = k
            self.models_.append(clf.booster_)
            best.append(clf.best_iteration_ or clf.n_estimators)
        self.oof_auc_ = float(roc_auc_score(y, self.oof_proba_))
        self.n_estimators_ = max(1, round(float(np.mean(best))))
        final = self._classifier(seed, n_estimators=self.n_estimators_)
        self.final_model_ = final.fit(X, y).booster_
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def _check(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "final_model_"):
            raise RuntimeError("Teacher is not fitted")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} columns, got {X.shape}")
        return X

    def predict_risk(self, X: np.ndarray) -> np.ndarray:
        """p(y = 1 | x) from the final model, ``float64[n]``."""
        return np.asarray(self.final_model_.predict(self._check(X)), dtype=np.float64)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``[n, 2]`` class probabilities (scikit-learn's convention)."""
        p = self.predict_risk(X)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.predict_risk(X) >= 0.5).astype(np.int64)

    def leaves(self, X: np.ndarray) -> np.ndarray:
        """Leaf index of every row in every tree of the final model, ``int32[n, n_trees]``."""
        out = self.final_model_.predict(self._check(X), pred_leaf=True)
        return np.asarray(out, dtype=np.int32).reshape(len(X), -1)

    @property
    def n_trees_(self) -> int:
        return int(self.final_model_.num_trees())

    def save(self, model_path: str | Path, params_path: str | Path) -> None:
        """The final booster as LightGBM text and the parameters as JSON (both atomic)."""
        text = self.final_model_.model_to_string()
        with atomic_file(model_path) as fh:
            fh.write(text)
        write_json(params_path, {"params": self.get_params(), "n_estimators_": self.n_estimators_})

    @classmethod
    def load(cls, model_path: str | Path, params_path: str | Path) -> Teacher:
        """The saved teacher: its parameters and final booster (no out-of-fold state)."""
        saved = read_json(params_path)
        teacher = cls(**saved["params"])
        teacher.final_model_ = lgb.Booster(model_file=str(model_path))
        teacher.n_features_in_ = teacher.final_model_.num_feature()
        teacher.n_estimators_ = saved["n_estimators_"]
        teacher.classes_ = np.array([0, 1])
        return teacher
