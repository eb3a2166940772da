"""Readable rules: conditions on one feature, conjunctions of them, and ordered sets of rules.

A rule set flags a row when any of its rules fires (an "or of ands"). Missing values are
explicit: a comparison never matches a missing value unless the condition says
``or is missing``, and ``is missing`` / ``is not missing`` are conditions of their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from creditgraph.utils.io import _json_default, write_json

Op = Literal["<=", ">", "is missing", "is not missing"]
OPS: tuple[str, ...] = ("<=", ">", "is missing", "is not missing")
FORMAT_VERSION = 1


def format_number(value: float) -> str:
    """The shortest text that parses back to exactly ``value`` (integers without ``.0``)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Condition:
    """``feature op threshold``, optionally also matching rows where the feature is missing."""

    feature: str
    op: Op
    threshold: float | None = None
    include_missing: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown operator {self.op!r}; expected one of {OPS}")
        if self.op in ("<=", ">"):
            if self.threshold is None or not math.isfinite(float(self.threshold)):
                raise ValueError(f"condition on {self.feature!r} needs a finite threshold")
            object.__setattr__(self, "threshold", float(self.threshold))
        else:
            if self.include_missing:
                raise ValueError("include_missing only applies to comparisons")
            object.__setattr__(self, "threshold", None)

    def mask(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows this condition matches (``values`` float, NaN = missing)."""
        v = np.asarray(values, dtype=np.float64)
        missing = np.isnan(v)
        if self.op == "is missing":
            return missing
        if self.op == "is not missing":
            return ~missing
        with np.errstate(invalid="ignore"):
            hit = v <= self.threshold if self.op == "<=" else v > self.threshold
        return hit | missing if self.include_missing else hit & ~missing

    @property
    def text(self) -> str:
        if self.threshold is None:
            return f"{self.feature} {self.op}"
        base = f"{self.feature} {self.op} {format_number(self.threshold)}"
        return f"({base} or {self.feature} is missing)" if self.include_missing else base

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"feature": self.feature, "op": self.op}
        if self.threshold is not None:
            d["threshold"] = self.threshold
            d["include_missing"] = self.include_missing
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Condition:
        return cls(
            feature=str(d["feature"]),
            op=d["op"],
            threshold=d.get("threshold"),
            include_missing=bool(d.get("include_missing", False)),
        )


@dataclass(frozen=True)
class Rule:
    """A conjunction of conditions; ``stats`` holds its training support/confidence."""

    conditions: tuple[Condition, ...]
    name: str = ""
    stats: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def length(self) -> int:
        return len(self.conditions)

    @property
    def features(self) -> list[str]:
        return sorted({c.feature for c in self.conditions})

    @property
    def text(self) -> str:
        return " and ".join(c.text for c in self.conditions) if self.conditions else "true"

    @property
    def key(self) -> tuple:
        """Identity of the logical rule, independent of its name and condition order."""
        return tuple(
            sorted(
                (
                    c.feature,
                    c.op,
                    -math.inf if c.threshold is None else c.threshold,
                    c.include_missing,
                )
                for c in self.conditions
            )
        )

    def covers(self, X: pd.DataFrame | dict[str, np.ndarray]) -> np.ndarray:
        """Boolean mask of the rows matched by every condition."""
        n = _n_rows(X)
        out = np.ones(n, dtype=bool)
        for c in self.conditions:
            out &= c.mask(_column(X, c.feature))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text": self.text,
            "conditions": [c.to_dict() for c in self.conditions],
            "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        return cls(
            conditions=tuple(Condition.from_dict(c) for c in d["conditions"]),
            name=str(d.get("name", "")),
            stats={k: float(v) for k, v in (d.get("stats") or {}).items()},
        )


def _n_rows(X: pd.DataFrame | dict[str, np.ndarray]) -> int:
    if isinstance(X, pd.DataFrame):
        return len(X)
    return len(next(iter(X.values()))) if X else 0


def _column(X: pd.DataFrame | dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in X:
        raise KeyError(f"rule feature {name!r} is not a column of the data")
    col = X[name]
    if isinstance(col, pd.Series):
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(col, dtype=np.float64)


@dataclass
class RuleSet:
    """An ordered "or of ands": a row is flagged when any rule fires; the first firing rule
    (rules are ordered by training confidence, highest first) is the one reported for it."""

    rules: list[Rule] = field(default_factory=list)
    target: str = "target"
    min_confidence: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __getitem__(self, i: int) -> Rule:
        return self.rules[i]

    @property
    def features(self) -> list[str]:
        return sorted({f for r in self.rules for f in r.features})

    @property
    def mean_length(self) -> float:
        return float(np.mean([r.length for r in self.rules])) if self.rules else 0.0

    def rule(self, name: str) -> Rule:
        """The rule called ``name``."""
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named {name!r}")

    def coverage(self, X: pd.DataFrame | dict[str, np.ndarray]) -> np.ndarray:
        """``bool[n_rows, n_rules]``: which rule matches which row."""
        n = _n_rows(X)
        if not self.rules:
            return np.zeros((n, 0), dtype=bool)
        return np.column_stack([r.covers(X) for r in self.rules])

    def predict(self, X: pd.DataFrame | dict[str, np.ndarray]) -> np.ndarray:
        """1 where any rule fires, else 0."""
        return self.coverage(X).any(axis=1).astype(np.int64)

    def match(
        self, X: pd.DataFrame | dict[str, np.ndarray], what: Literal["name", "text"] = "name"
    ) -> np.ndarray:
        """Per row, the name (or text) of the first rule that fires, ``None`` where none does.

        This is the guardrail hook: a decision step caps the rows with a non-``None`` entry and
        reports the rule that caught them.
        """
        cov = self.coverage(X)
        out = np.full(cov.shape[0], None, dtype=object)
        if cov.shape[1] == 0:
            return out
        hit = cov.any(axis=1)
        first = cov.argmax(axis=1)
        labels = np.array([r.name if what == "name" else r.text for r in self.rules], dtype=object)
        out[hit] = labels[first[hit]]
        return out

    # --- serialization (text, SQL and pandas exports live in rules/export.py) ------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "creditgraph.rules.RuleSet",
            "target": self.target,
            "min_confidence": self.min_confidence,
            "rules": [r.to_dict() for r in self.rules],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleSet:
        if d.get("kind", "creditgraph.rules.RuleSet") != "creditgraph.rules.RuleSet":
            raise ValueError(f"not a rule set document (kind={d.get('kind')!r})")
        if int(d.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ValueError(f"rule set format {d['format_version']} is newer than this library")
        return cls(
            rules=[Rule.from_dict(r) for r in d.get("rules", [])],
            target=str(d.get("target", "target")),
            min_confidence=d.get("min_confidence"),
            meta=dict(d.get("meta") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> RuleSet:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the rule set as JSON (atomically)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read a rule set written by :meth:`save` (or ``rules.json`` of ``creditgraph rules``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "rules.json"
        return cls.from_json(path.read_text())


def simplify(conditions: Sequence[Condition]) -> tuple[Condition, ...] | None:
    """Merge conditions on the same feature into at most a lower and an upper bound.

    Returns ``None`` when the conjunction can match nothing. The result matches exactly the
    same rows as the input, and is ordered by first appearance of each feature.
    """
    order: list[str] = []
    state: dict[str, dict[str, Any]] = {}
    for c in conditions:
        if c.feature not in state:
            order.append(c.feature)
            state[c.feature] = {"lo": -math.inf, "hi": math.inf, "miss": True, "obs": True}
        s = state[c.feature]
        if c.op == "is missing":
            s["obs"] = False
        elif c.op == "is not missing":
            s["miss"] = False
        else:
            s["miss"] = s["miss"] and c.include_missing
            if c.op == "<=":
                s["hi"] = min(s["hi"], c.threshold)
            else:
                s["lo"] = max(s["lo"], c.threshold)
    out: list[Condition] = []
    for f in order:
        s = state[f]
        obs = s["obs"] and s["lo"] < s["hi"]
        if not obs and not s["miss"]:
            return None
        if not obs:
            out.append(Condition(f, "is missing"))
            continue
        bounded = False
        if s["lo"] > -math.inf:
            out.append(Condition(f, ">", s["lo"], s["miss"]))
            bounded = True
        if s["hi"] < math.inf:
            out.append(Condition(f, "<=", s["hi"], s["miss"]))
            bounded = True
        if not bounded and not s["miss"]:
            out.append(Condition(f, "is not missing"))
    return tuple(out)
