"""GBDT-leaf encoding of raw order features (seed 001, §3.4), fitted without leaking labels.

A LightGBM model on the raw order features; the index of the leaf each order falls in, per tree,
is the network's input (embedded and averaged over trees, as Facebook's GBDT+LR feeds its linear
model). Labels must not reach the network through the leaves, so the encoder is fitted in one of
two ways (:class:`LeafEncoder`, ``mode``):

* ``earlier_period`` (default): one model on the earliest labeled training orders only (the
  split's ``early`` period); the network trains and is tested on later orders, so no order in
  its loss or test set, and no order whose label was not known when it was placed, was seen by
  the model whose leaves it or its graph neighbours carry;
* ``out_of_fold``: K models on K folds of the labeled training orders; a training order's leaves
  come from the model of its own fold, which never saw its label; every other order (test,
  context, online) uses model 0, which never saw it either. Each model has its own leaf
  vocabulary. An order's graph *neighbours* may carry leaves from a model that saw its label,
  which ``earlier_period`` rules out; it uses all the training labels for the leaves instead.

Missing values stay NaN: LightGBM routes them by a learned default direction.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.base import BaseEstimator
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import KFold

from creditgraph.graph.events import (
    SPLIT_EARLY,
    SPLIT_TRAIN,
    SPLIT_VAL,
    load_orders_table,
)
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import RunLayout, as_layout
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


class LeafConfig(BaseModel):
    """The GBDT whose leaves are the network's input."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["earlier_period", "out_of_fold"] = "earlier_period"
    n_folds: int = Field(5, ge=2, description="out_of_fold: number of fold models")
    n_estimators: int = Field(100, ge=1)
    num_leaves: int = Field(15, ge=2, le=255)
    learning_rate: float = Field(0.1, gt=0)
    min_child_samples: int = Field(50, ge=1)
    early_stopping: int | None = Field(
        20, ge=1, description="rounds without improvement on the fit rows' latest tenth"
    )
    seed: int = 0


class LeafEncoder(BaseEstimator):
    """Leaf indices of a LightGBM classifier (or K fold classifiers) as integer codes.

    ``fit(X, y)`` fits one model (``earlier_period``: the caller passes the earlier period's
    rows) or ``n_folds`` fold models (``out_of_fold``). ``transform(X, fold)`` returns
    ``(leaves uint8[n, n_trees_], fold int8[n])``: rows with ``fold = -1`` (not fitted on) use
    model 0. ``fold_`` holds the fold of every fitted row.
    """

    def __init__(
        self,
        mode: Literal["earlier_period", "out_of_fold"] = "earlier_period",
        n_folds: int = 5,
        n_estimators: int = 100,
        num_leaves: int = 15,
        learning_rate: float = 0.1,
        min_child_samples: int = 50,
        early_stopping: int | None = 20,
        n_jobs: int = 2,
        random_state: int = 0,
    ) -> None:
        self.mode = mode
        self.n_folds = n_folds
        self.n_estimators = n_estimators
        self.num_leaves = num_leaves
        self.learning_rate = learning_rate
        self.min_child_samples = min_child_samples
        self.early_stopping = early_stopping
        self.n_jobs = n_jobs
        self.random_state = random_state

    @classmethod
    def from_config(cls, cfg: LeafConfig, n_jobs: int = 2) -> LeafEncoder:
        return cls(
            mode=cfg.mode,
            n_folds=cfg.n_folds,
            n_estimators=cfg.n_estimators,
            num_leaves=cfg.num_leaves,
            learning_rate=cfg.learning_rate,
            min_child_samples=cfg.min_child_samples,
            early_stopping=cfg.early_stopping,
            n_jobs=n_jobs,
            random_state=cfg.seed,
        )

    def _booster(self, X: np.ndarray, y: np.ndarray, n_trees: int | None = None) -> lgb.Booster:
        """One model; early stopping on the rows' latest tenth (rows come in time order)."""
        params = {
            "objective": "binary",
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_child_samples": self.min_child_samples,
            "subsample": 0.8,
            "subsample_freq": 1,
            "colsample_bytree": 0.8,
            "reg_lambda": 1.0,
            "num_threads": self.n_jobs,
            "seed": self.random_state,
            "deterministic": True,
            "verbose": -1,
        }
        if n_trees is not None or not self.early_stopping or len(y) < 200:
            data = lgb.Dataset(X, y, free_raw_data=True)
            return lgb.train(params, data, num_boost_round=n_trees or self.n_estimators)
        cut = int(0.9 * len(y))
        if y[cut:].min() == y[cut:].max():  # the tail holds one class only: no early stopping
            return lgb.train(params, lgb.Dataset(X, y), num_boost_round=self.n_estimators)
        fit, stop = lgb.Dataset(X[:cut], y[:cut]), lgb.Dataset(X[cut:], y[cut:])
        booster = lgb.train(
            params,
            fit,
            num_boost_round=self.n_estimators,
            valid_sets=[stop],
            callbacks=[lgb.early_stopping(self.early_stopping, verbose=False)],
        )
        # refit on all rows with the chosen number of trees
        return self._booster(X, y, n_trees=max(1, booster.best_iteration or self.n_estimators))

    def fit(self, X: np.ndarray, y: np.ndarray) -> LeafEncoder:
        """Fit on labeled rows (NaN in ``X`` = missing; ``y`` in {0, 1}), in time order."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(y) == 0 or not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("LeafEncoder.fit needs labels in {0, 1} (no NaN)")
        if y.min() == y.max():
            raise ValueError("LeafEncoder.fit needs both classes among the rows")
        if self.mode == "earlier_period":
            self.boosters_ = [self._booster(X, y)]
            self.fold_ = np.zeros(len(y), dtype=np.int8)
        elif self.mode == "out_of_fold":
            k = self.n_folds
            # folds drawn without looking at the labels: a row's fold never depends on them
            kf = KFold(k, shuffle=True, random_state=self.random_state)
            self.fold_ = np.zeros(len(y), dtype=np.int8)
            for f, (_, held) in enumerate(kf.split(X)):
                self.fold_[held] = f
            self.boosters_ = [self._booster(X[self.fold_ != f], y[self.fold_ != f])
                              for f in range(k)]  # fmt: skip
        else:
            raise ValueError(f"unknown mode {self.mode!r}")
        # every model has the same number of trees (the smallest): one embedding layout
        self.n_trees_ = int(min(b.num_trees() for b in self.boosters_))
        self.n_models_ = len(self.boosters_)
        self.leaf_values_ = self._leaf_values()
        return self

    def _leaf_values(self) -> np.ndarray:
        """``float64[n_models, n_trees, num_leaves]``: each leaf's output (its raw score)."""
        values = np.zeros((len(self.boosters_), self.n_trees_, self.num_leaves))

        def walk(node: dict, m: int, t: int) -> None:
            if "leaf_index" in node:
                values[m, t, node["leaf_index"]] = node["leaf_value"]
                return
            walk(node["left_child"], m, t)
            walk(node["right_child"], m, t)

        for m, b in enumerate(self.boosters_):
            for t, tree in enumerate(b.dump_model()["tree_info"][: self.n_trees_]):
                walk(tree["tree_structure"], m, t)
        return values

    def margin(self, leaves: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """The GBDT's raw score (logit) from leaf codes: the sum of the leaves' outputs. Batch
        and online compute it from the same leaves, so they agree exactly."""
        leaves = np.asarray(leaves, dtype=np.int64)
        fold = np.maximum(np.asarray(fold, dtype=np.int64), 0)
        t = np.arange(self.n_trees_)
        return self.leaf_values_[fold[:, None], t[None, :], leaves].sum(axis=1)

    def transform(
        self, X: np.ndarray, fold: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(leaves uint8[n, n_trees_], fold int8[n])``: each row encoded by the model of its
        fold; ``fold`` -1 or absent means model 0 (a row no model was fitted on)."""
        X = np.asarray(X, dtype=np.float64)
        fold = np.zeros(len(X), np.int8) if fold is None else np.maximum(np.asarray(fold), 0)
        out = np.zeros((len(X), self.n_trees_), dtype=np.uint8)
        for f in np.unique(fold):
            rows = fold == f
            leaves = self.boosters_[int(f)].predict(
                X[rows], pred_leaf=True, num_iteration=self.n_trees_
            )
            out[rows] = np.asarray(leaves, dtype=np.int64).reshape(int(rows.sum()), -1)
        return out, fold.astype(np.int8)

    def predict_proba(self, X: np.ndarray, fold: np.ndarray | None = None) -> np.ndarray:
        """p(fraud) of the model each row is encoded by (``[n, 2]``, scikit-learn style)."""
        X = np.asarray(X, dtype=np.float64)
        fold = np.zeros(len(X), np.int8) if fold is None else np.maximum(np.asarray(fold), 0)
        p = np.zeros(len(X))
        for f in np.unique(fold):
            rows = fold == f
            p[rows] = self.boosters_[int(f)].predict(X[rows], num_iteration=self.n_trees_)
        return np.stack([1 - p, p], axis=1)

    @property
    def vocab_size_(self) -> int:
        """Distinct (model, tree, leaf) codes: the size of the network's embedding table."""
        return self.n_models_ * self.n_trees_ * self.num_leaves

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        for f, b in enumerate(self.boosters_):
            b.save_model(str(folder / f"leaf_model_{f}.txt"), num_iteration=self.n_trees_)
        write_json(
            folder / "leaf_encoder.json",
            {"params": self.get_params(), "n_trees": self.n_trees_, "n_models": self.n_models_},
        )

    @classmethod
    def load(cls, folder: str | Path) -> LeafEncoder:
        folder = Path(folder)
        meta = read_json(folder / "leaf_encoder.json")
        self = cls(**meta["params"])
        self.boosters_ = [
            lgb.Booster(model_file=str(folder / f"leaf_model_{f}.txt"))
            for f in range(meta["n_models"])
        ]
        self.n_trees_ = meta["n_trees"]
        self.n_models_ = meta["n_models"]
        self.leaf_values_ = self._leaf_values()
        return self


def leaf_fit_codes(mode: str) -> tuple[int, ...]:
    """Split codes the leaf encoder is fitted on; the network trains on the others' labels."""
    return (SPLIT_EARLY,) if mode == "earlier_period" else (SPLIT_EARLY, SPLIT_TRAIN)


def network_train_codes(mode: str) -> tuple[int, ...]:
    """Split codes whose labels train the network (never those the leaves were fitted on in
    ``earlier_period`` mode; the same orders in ``out_of_fold`` mode, each encoded out of fold)."""
    return (SPLIT_TRAIN,) if mode == "earlier_period" else (SPLIT_EARLY, SPLIT_TRAIN)


def run_leaves(run: RunLayout | str | Path, cfg: LeafConfig | None = None) -> dict[str, Any]:
    """Fit the leaf encoder on ``RUN/events`` and write ``RUN/leaves``: the model(s), every
    order's leaves and fold, and the raw-feature standardization (fitted on the orders before the
    test period; features only)."""
    cfg = cfg or LeafConfig()
    run = as_layout(run)
    t0 = time.perf_counter()
    manifest = read_json(run.events.manifest)
    orders = load_orders_table(run)
    X = np.load(run.events.dir / "features.npy")
    split = orders["split"].to_numpy()
    y = orders["y_train"].to_numpy()
    fit_rows = np.flatnonzero(np.isin(split, leaf_fit_codes(cfg.mode)) & np.isfinite(y))
    fit_rows = fit_rows[np.argsort(orders["t_days"].to_numpy()[fit_rows], kind="stable")]
    enc = LeafEncoder.from_config(cfg).fit(X[fit_rows], y[fit_rows])
    fold = np.full(len(X), -1, dtype=np.int8)
    fold[fit_rows] = enc.fold_
    leaves, fold_used = enc.transform(X, fold)
    val = (split == SPLIT_VAL) & np.isfinite(y)
    p_val = enc.predict_proba(X[val], fold_used[val])[:, 1]
    before_test = np.isin(split, (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL))
    std = FeatureStandardizer().fit(X[before_test], manifest["feature_names"])
    summary = {
        "mode": cfg.mode,
        "fit_orders": len(fit_rows),
        "fit_positives": int(y[fit_rows].sum()),
        "n_trees": enc.n_trees_,
        "n_models": enc.n_models_,
        "num_leaves": cfg.num_leaves,
        "val_auc": float(roc_auc_score(y[val], p_val)) if 0 < y[val].sum() < val.sum() else None,
        "val_ap": float(average_precision_score(y[val], p_val)) if y[val].sum() > 0 else None,
        "network_train_codes": list(network_train_codes(cfg.mode)),
        "seconds": time.perf_counter() - t0,
    }
    with atomic_dir(run.leaves.dir) as tmp:
        enc.save(tmp)
        np.save(tmp / "leaves.npy", leaves)
        np.save(tmp / "fold.npy", fold_used)
        np.save(tmp / "gbdt_logit.npy", enc.margin(leaves, fold_used).astype(np.float32))
        write_json(tmp / "feature_stats.json", std.to_records())
        write_json(tmp / "manifest.json", {"config": cfg.model_dump(), **summary})
    log.info(
        "leaf encoder (%s): %d trees x %d model(s) on %d orders, validation AP %s",
        cfg.mode, enc.n_trees_, enc.n_models_, len(fit_rows), summary["val_ap"],
    )  # fmt: skip
    return summary
