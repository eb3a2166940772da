"""Limit decisions: the risk ceiling, the DSL rule, guardrails and cluster caps.

- :mod:`creditgraph.policy.decide`: ``largest_feasible_limit`` (the rule), ``decide`` (batch),
  ``online_decision`` (one user), ``DecisionTable``;
- :mod:`creditgraph.policy.clusters`: ``build_clusters`` / ``clusters_for_dataset``;
- :mod:`creditgraph.policy.config`: ``PolicyConfig`` (the ``policy`` section of pipeline.yaml).
"""
