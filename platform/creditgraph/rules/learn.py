"""``creditgraph rules``: learn a rule set from a dataset directory or a CSV/parquet table.

Reads the data, splits train / validation (stratified, seeded), fits ``ConstrainedRuleSet`` on
the training rows, reports every rule's support and confidence on the validation rows, and
writes ``rules.json``, ``rules.sql``, ``rules.txt`` and ``summary.json`` atomically into ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import Dataset
from creditgraph.rules.config import RulesConfig
from creditgraph.rules.estimator import ConstrainedRuleSet, stratified_split
from creditgraph.rules.export import pandas_query, sql_where, write_exports
from creditgraph.rules.rule import RuleSet
from creditgraph.utils.io import atomic_dir
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass
class TrainingTable:
    """Features (NaN = missing), 0/1 labels of the labeled rows, and where they came from."""

    X: pd.DataFrame
    y: np.ndarray
    target: str
    source: str
    dropped_unlabeled: int


def _is_id_column(name: str) -> bool:
    low = name.lower()
    return low == "id" or low.endswith("_id")


def _labels(values: pd.Series, file: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and the mask of labeled rows; anything but 0, 1 or null is an error."""
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)) and (
        kind not in ("integer", "floating", "boolean", "empty", "mixed-integer-float")
    ):
        raise DataValidationError(file, column, f"target must be 0/1, found {kind} values")
    y = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        rows = np.flatnonzero(bad)[:5]
        raise DataValidationError(
            file,
            column,
            "target must be 0, 1 or missing",
            rows=rows.tolist(),
            examples=[repr(values.iloc[r]) for r in rows],
            count=int(bad.sum()),
        )
    labeled = ~np.isnan(y)
    if labeled.sum() == 0 or len(np.unique(y[labeled])) < 2:
        raise DataValidationError(file, column, "target needs labeled rows of both classes")
    return y, labeled


def dataset_features(ds: Dataset, include_treatment: bool = False) -> pd.DataFrame:
    """The columns rules are learned on and applied to, named as in ``dataset.yaml``: the
    dataset's features (NaN = missing) and, optionally, the historical limit under the
    treatment column's name. Use it to apply a learned rule set to a dataset's users."""
    cols = {f: ds.features[f].to_numpy(dtype=np.float64) for f in ds.feature_names}
    if include_treatment:
        cols[ds.spec.treatment] = ds.treatment
    return pd.DataFrame(cols, index=ds.features.index)


def load_training_table(
    data: str | Path,
    target: str | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    include_treatment: bool = False,
) -> TrainingTable:
    """Features and labels from a dataset directory (the data contract) or a CSV/parquet file.

    Directory: features are the dataset's features (plus the treatment, the historical limit,
    when ``include_treatment``); the target defaults to the outcome column. File: the target
    column must be named; every other numeric column is a feature except ``exclude`` and
    id-like columns (``id``, ``*_id``). Rows with a missing target are dropped.
    """
    data = Path(data)
    exclude = list(exclude)
    if data.is_dir():
        from creditgraph.data.load import load_dataset

        ds = load_dataset(data, with_truth=False)
        spec = ds.spec
        file = str(data / spec.users)
        cols = dict(dataset_features(ds, include_treatment).items())
        if target is None or target in (spec.outcome, "outcome"):
            target_name, y_raw = spec.outcome, pd.Series(ds.outcome)
        elif target in cols:
            target_name, y_raw = target, cols.pop(target)
        else:
            raise DataValidationError(
                file,
                target,
                f"target column not found; use the outcome {spec.outcome!r} or one of "
                f"{sorted(cols)[:20]}",
            )
        unknown = [c for c in exclude if c not in cols]
        if unknown:
            raise DataValidationError(file, unknown[0], "excluded column is not a feature")
        X = pd.DataFrame({k: v for k, v in cols.items() if k not in exclude})
    elif data.is_file() and data.suffix.lower() in TABLE_SUFFIXES:
        file = str(data)
        try:
            raw = pd.read_csv(data) if data.suffix.lower() == ".csv" else pd.read_parquet(data)
        except Exception as exc:
            raise DataValidationError(file, message=f"cannot be read: {exc}") from exc
        if target is None:
            raise DataValidationError(file, message="name the label column with --target")
        if target not in raw.columns:
            raise DataValidationError(
                file, target, f"target column not found; columns: {list(raw.columns)[:30]}"
            )
        unknown = [c for c in exclude if c not in raw.columns]
        if unknown:
            raise DataValidationError(file, unknown[0], "excluded column not found")
        target_name, y_raw = target, raw[target]
        feats, skipped = [], []
        for c in raw.columns:
            if c == target or c in exclude or _is_id_column(str(c)):
                continue
            s = raw[c]
            if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                feats.append(c)
            else:
                skipped.append(c)
        if skipped:
            log.warning("non-numeric columns are not used as features: %s", skipped[:10])
        if not feats:
            raise DataValidationError(file, message="no numeric feature columns")
        X = pd.DataFrame(
            {str(c): raw[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in feats}
        )
        inf = np.isinf(X.to_numpy())
        if inf.any():
            col = X.columns[int(np.flatnonzero(inf.any(axis=0))[0])]
            raise DataValidationError(file, col, "infinite values (use empty/NaN for missing)")
    else:
        raise DataValidationError(
            str(data), message="not a dataset directory or a .csv/.parquet file"
        )
    y, labeled = _labels(y_raw.reset_index(drop=True), file, target_name)
    X = X.reset_index(drop=True)
    return TrainingTable(
        X=X.loc[labeled].reset_index(drop=True),
        y=y[labeled].astype(np.int8),
        target=target_name,
        source=str(data),
        dropped_unlabeled=int((~labeled).sum()),
    )


def rule_table(rs: RuleSet, X: pd.DataFrame, y: np.ndarray) -> list[dict[str, Any]]:
    """Per rule (and for the whole set): support and confidence on ``(X, y)``."""
    cov = rs.coverage(X)
    rows = []
    for j, r in enumerate(rs.rules):
        n = int(cov[:, j].sum())
        tp = int((cov[:, j] & (y == 1)).sum())
        rows.append(
            {
                "name": r.name,
                "rule": r.text,
                "length": r.length,
                "support": n,
                "confidence": tp / n if n else None,
                "train_support": int(r.stats.get("support", 0)),
                "train_confidence": r.stats.get("confidence"),
            }
        )
    return rows


def set_metrics(flagged: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Flagged rows, confidence (precision) and recall of a 0/1 prediction."""
    flagged = np.asarray(flagged, dtype=bool)
    n, tp, pos = int(flagged.sum()), int((flagged & (y == 1)).sum()), int((y == 1).sum())
    return {
        "rows": len(y),
        "flagged": n,
        "confidence": tp / n if n else None,
        "recall": tp / pos if pos else None,
    }


def make_estimator(cfg: RulesConfig) -> ConstrainedRuleSet:
    """The estimator ``cfg`` describes; bad settings fail here, before any data is read."""
    valid = ConstrainedRuleSet().get_params()
    unknown = sorted(set(cfg.estimator) - set(valid))
    if unknown:
        raise ValueError(f"unknown rule estimator parameter(s) {unknown}; known: {sorted(valid)}")
    params = {**cfg.estimator, "min_confidence": cfg.min_confidence, "random_state": cfg.seed}
    estimator = ConstrainedRuleSet(**params)
    estimator._check_params()
    return estimator


def learn_rules(
    data: str | Path,
    out: str | Path,
    cfg: RulesConfig | None = None,
    *,
    show: bool = True,
) -> dict[str, Any]:
    """Learn a rule set under ``cfg.min_confidence`` and write the exports into ``out``.

    Returns the summary written to ``summary.json``.
    """
    cfg = cfg or RulesConfig()
    estimator = make_estimator(cfg)
    table = load_training_table(data, cfg.target, cfg.exclude, cfg.include_treatment)
    tr, va = stratified_split(table.y, cfg.validation_fraction, cfg.seed)
    X_tr, y_tr = table.X.iloc[tr].reset_index(drop=True), table.y[tr]
    X_va, y_va = table.X.iloc[va].reset_index(drop=True), table.y[va]
    log.info(
        "learning rules for %s = 1 at confidence >= %g on %d rows (%d validation)",
        table.target,
        cfg.min_confidence,
        len(tr),
        len(va),
    )
    estimator.fit(X_tr, y_tr, target_name=table.target)
    rs = estimator.rules_
    per_rule = rule_table(rs, X_va, y_va)
    val = set_metrics(estimator.predict(X_va), y_va)
    train = set_metrics(estimator.predict(X_tr), y_tr)
    summary = {
        "source": table.source,
        "target": table.target,
        "min_confidence": cfg.min_confidence,
        "rows": {
            "train": len(tr),
            "validation": len(va),
            "unlabeled_dropped": table.dropped_unlabeled,
        },
        "features": list(table.X.columns),
        "rules": per_rule,
        "train": train,
        "validation": val,
        "validation_meets_constraint": (
            None if val["confidence"] is None else bool(val["confidence"] >= cfg.min_confidence)
        ),
        "n_rules": len(rs),
        "mean_rule_length": rs.mean_length,
        "fit": estimator.fit_stats_,
        "config": cfg.model_dump(mode="json"),
        "sql_where": sql_where(rs),
        "pandas_query": pandas_query(rs),
    }
    with atomic_dir(out) as tmp:
        write_exports(rs, tmp, summary)
    if show:
        print_rules(rs, per_rule, train, val, cfg.min_confidence)
    return summary


def print_rules(
    rs: RuleSet,
    per_rule: list[dict[str, Any]],
    train: dict[str, Any],
    val: dict[str, Any],
    c: float,
) -> None:
    """A rich table of the rules with their validation support and confidence."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"rules flagging {rs.target} = 1 (confidence constraint {c:g})",
        show_lines=False,
    )
    for col in ("rule", "IF", "val support", "val confidence", "train confidence"):
        table.add_column(col, justify="left" if col in ("rule", "IF") else "right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for row in per_rule:
        table.add_row(
            row["name"],
            row["rule"],
            str(row["support"]),
            fmt(row["confidence"]),
            fmt(row["train_confidence"]),
        )
    if not per_rule:
        table.add_row("-", "no rule set meets the constraint on the training rows", "", "", "")
    console.print(table)
    met = val["confidence"] is not None and val["confidence"] >= c
    console.print(
        f"rule set: {len(rs)} rules; validation: {val['flagged']} flagged, confidence "
        f"{fmt(val['confidence'])} ({'meets' if met else 'below'} {c:g}), recall "
        f"{fmt(val['recall'])}; train: confidence {fmt(train['confidence'])}, recall "
        f"{fmt(train['recall'])}",
        highlight=False,
    )
