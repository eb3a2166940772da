"""CRSL: readable rule sets under a confidence constraint (seed 002, Ant Group, CIKM 2022).

- :class:`ConstrainedRuleSet`: the estimator (CARM mining on Ray, three-filter ranking,
  constraint-adaptive Bayesian selection by MCMC);
- :class:`RuleSet` / :class:`Rule` / :class:`Condition`: the learned rules with text, JSON,
  SQL and pandas exports, ``predict`` and ``match`` (the first rule firing per row, for
  guardrails);
- :func:`learn_rules`: what ``creditgraph rules`` runs.

Names are imported lazily so that reading the pipeline config does not load scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Condition": "creditgraph.rules.rule",
    "Rule": "creditgraph.rules.rule",
    "RuleSet": "creditgraph.rules.rule",
    "ConstrainedRuleSet": "creditgraph.rules.estimator",
    "RulesConfig": "creditgraph.rules.config",
    "learn_rules": "creditgraph.rules.learn",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'creditgraph.rules' has no attribute {name!r}")
