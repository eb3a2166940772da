"""The scoring context: everything the last layer needs for a batch of users, from any source.

A :class:`Context` holds, per user, its raw features, limit, decision time, structural features,
interference tokens of hops 1..L and the cluster cap it may take. It comes from

* batch scoring, which computes it for every user of a dataset on the dataset's own graph;
* a snapshot, for users the batch scored (:func:`read_known`);
* a snapshot's entity records, for applicants the model has never seen (:func:`for_applicants`):
  the applicant's own features plus the stored sums of the entities it names go through the last
  hop layers, as seed 001's online half does.

:func:`evaluate` is the one function that turns a context into curves, uncertainty and DSL
scores; :func:`decide` the one that turns those into decisions. Batch scoring, the Serve
deployments and the tests all call them, which is why online and batch decisions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from creditgraph.data.spec import EntityType
from creditgraph.graph.entities import entity_key, load_salt
from creditgraph.graph.temporal import struct_from_pairs
from creditgraph.layout import RunLayout, as_layout
from creditgraph.model.infer import Inference
from creditgraph.policy.calibrate import Calibration
from creditgraph.policy.config import PolicyConfig
from creditgraph.policy.decide import DecisionTable
from creditgraph.policy.deploy import DeployedPolicy
from creditgraph.rules.estimator import ConstrainedRuleSet
from creditgraph.serving.records import Dims
from creditgraph.serving.snapshot import Snapshot
from creditgraph.utils.io import read_json

NO_CLUSTER = -1


@dataclass
class ScoringBundle:
    """What scoring needs from a trained run, loaded once: the model (with standardization and
    teacher), the run's entity types and salt, its limit scale and the resolved policy, and the
    guardrail rules when given."""

    run: RunLayout
    inference: Inference
    policy: PolicyConfig
    entities: dict[str, EntityType]
    entity_types: list[str]
    type_weights: np.ndarray
    history_days: float
    salt: bytes
    id_column: str
    model_version: str
    graph_version: str
    limit_scale: dict
    rules: ConstrainedRuleSet | None = None
    calibration: Calibration | None = None

    @classmethod
    def load(
        cls,
        run: RunLayout | str | Path,
        policy: PolicyConfig | None = None,
        rules_dir: str | Path | None = None,
    ) -> ScoringBundle:
        run = as_layout(run)
        graph = read_json(run.graph.manifest)
        spec = graph["dataset"]
        entities = {k: EntityType(**v) for k, v in (spec.get("entities") or {}).items()}
        types = list(graph.get("entity_types") or graph["edges"].get("entity_types", []))
        scale = graph.get("limits", {})
        inference = Inference.load(run)
        return cls(
            run=run,
            inference=inference,
            policy=(policy or PolicyConfig()).resolve(scale),
            entities=entities,
            entity_types=types,
            type_weights=np.array(
                [entities.get(t, EntityType()).weight for t in types], dtype=np.float64
            ),
            history_days=float(spec.get("history_days", 90.0)),
            salt=load_salt(run.graph.salt),
            id_column=spec["id"],
            model_version=read_json(run.model.manifest)["version"],
            graph_version=graph["fingerprint"],
            limit_scale=scale,
            rules=None if rules_dir is None else ConstrainedRuleSet.load(rules_dir),
            calibration=Calibration.load(run),
        )

    @property
    def dims(self) -> Dims:
        inf = self.inference
        return Dims(len(inf.feature_names), inf.model.spec.n_struct, inf.hops, inf.hidden)

    @property
    def feature_names(self) -> list[str]:
        return self.inference.feature_names

    def key(self, entity_type: str, entity_id: Any) -> str:
        return entity_key(self.salt, entity_type, entity_id)

    @cached_property
    def type_tables(self) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        """Per entity type (the run's order): its code, super-node cut-off and whether it is a
        high-confidence type (one that joins credit clusters)."""
        types = [self.entities.get(t, EntityType()) for t in self.entity_types]
        return (
            {t: i for i, t in enumerate(self.entity_types)},
            np.array([t.max_degree for t in types], dtype=np.int64),
            np.array([t.high_confidence for t in types], dtype=bool),
        )

    @property
    def deployed(self) -> DeployedPolicy:
        """The policy as decisions apply it: the resolved config and the run's calibration."""
        return DeployedPolicy(self.policy, self.calibration)


@dataclass
class Context:
    """The last layer's inputs for ``n`` users (arrays of length n)."""

    user_id: np.ndarray  # object
    raw: np.ndarray  # float64 [n, F]
    limit: np.ndarray  # float64 [n]
    as_of: np.ndarray  # float64 [n], days since 1970
    struct: np.ndarray  # float32 [n, S]
    tokens: np.ndarray  # float32 [n, 2, L, d], hops 1..L
    user_cap: np.ndarray  # float64 [n], inf = none
    cluster_id: np.ndarray  # int64 [n]
    known: np.ndarray  # bool [n]: found in the snapshot (or scored in this batch)
    entities: list[list[dict]] = field(default_factory=list)  # per user: entities used

    def __len__(self) -> int:
        return len(self.raw)


@dataclass
class Evaluated:
    """:func:`evaluate`'s outputs for ``n`` users on a grid."""

    curves: np.ndarray  # [n, G] p(default | do(L))
    logit_std: np.ndarray  # [n, G] spread of the thinned towers on the logit scale
    p_factual: np.ndarray  # [n] at the user's own limit
    dsl: np.ndarray  # [n] DSL score in [0, 1]
    prob_std: np.ndarray  # [n] the DSL uncertainty part
    rule: np.ndarray  # object [n]: guardrail rule name or None
    rep: np.ndarray  # [n, r] representation (for diagnostics)


@dataclass
class Encoded:
    """The outcome tower's inputs and what the DSL score needs, for ``n`` users."""

    x: np.ndarray
    rep: np.ndarray
    completeness: np.ndarray
    limit: np.ndarray
    rule: np.ndarray  # object [n]: guardrail rule name or None


def guardrail_hits(bundle: ScoringBundle, raw: np.ndarray) -> np.ndarray:
    """The first guardrail rule each row of raw features (model order) matches, or None."""
    rule = np.full(len(raw), None, dtype=object)
    if bundle.rules is None or not len(raw):
        return rule
    # the rule set reads columns by name: a dict of the raw columns, no data frame per request
    columns = {name: raw[:, i] for i, name in enumerate(bundle.feature_names)}
    hits = bundle.rules.rules_.match(columns)
    for i, h in enumerate(hits):
        if h is not None and h == h and h != "":
            rule[i] = str(h)
    return rule


def encode(bundle: ScoringBundle, ctx: Context, h0: np.ndarray | None = None) -> Encoded:
    """The first half of :func:`evaluate`: a context's tower inputs and guardrail hits."""
    fin = bundle.inference.finish(ctx.raw, ctx.limit, ctx.struct, ctx.tokens, h0=h0)
    rule = guardrail_hits(bundle, np.asarray(ctx.raw, np.float64))
    return Encoded(fin.x, fin.rep, fin.completeness, np.asarray(ctx.limit, np.float64), rule)


def tower(bundle: ScoringBundle, enc: Encoded, grid: np.ndarray) -> Evaluated:
    """The second half of :func:`evaluate`: calibrated curves, uncertainty and DSL scores from
    tower inputs (curves and the factual risk pass through the run's calibration)."""
    inf = bundle.inference
    out = inf.tower_outputs(enc.x, grid, enc.limit, unc_grid=inf.unc_grid)
    cal = bundle.calibration.calibrate if bundle.calibration is not None else np.asarray
    return Evaluated(
        curves=cal(out.curves),
        logit_std=out.logit_std,
        p_factual=cal(out.factual),
        dsl=inf.dsl(enc.completeness, enc.rep, out.prob_std),
        prob_std=out.prob_std,
        rule=enc.rule,
        rep=enc.rep,
    )


def evaluate(
    bundle: ScoringBundle, ctx: Context, grid: np.ndarray, h0: np.ndarray | None = None
) -> Evaluated:
    """Curves, uncertainty, DSL scores and guardrail hits of a context (the one scoring path;
    the service runs its two halves, :func:`encode` and :func:`tower`, in two deployments)."""
    return tower(bundle, encode(bundle, ctx, h0), grid)


def decide(
    bundle: ScoringBundle,
    ev: Evaluated,
    ctx: Context,
    grid: np.ndarray,
    r_max: float | None = None,
    user_cap: np.ndarray | None = None,
    *,
    decision_time: float | None = None,
) -> DecisionTable:
    """The policy's decisions for evaluated users, with their per-user caps (the one decision
    path, :class:`~creditgraph.policy.deploy.DeployedPolicy`: batch passes the caps it allocated,
    online the snapshot's or the cluster's room). The current limit (``ctx.limit``) bounds how far
    a limit is cut; users with an id are drawn for exploration on ``decision_time`` (days)."""
    return bundle.deployed.decide(
        ev.curves,
        ev.logit_std,
        dsl_score=ev.dsl,
        guardrail_hits=ev.rule,
        r_max=r_max,
        user_cap=ctx.user_cap if user_cap is None else user_cap,
        cluster_id=ctx.cluster_id,
        current=ctx.limit,
        ids=ctx.user_id,
        decision_time=decision_time,
        grid=grid,
    )


# --- contexts from a snapshot ----------------------------------------------------------------


def read_known(snapshot: Snapshot, ids: Any) -> Context:
    """Contexts of users the batch scored (``known`` is False for the others)."""
    rec, found = snapshot.users(ids)
    return Context(
        user_id=np.asarray(ids, dtype=object),
        raw=rec["raw"].astype(np.float64),
        limit=rec["limit"].astype(np.float64),
        as_of=rec["as_of"].astype(np.float64),
        struct=rec["struct"].astype(np.float32),
        tokens=rec["tokens"].astype(np.float32),
        user_cap=np.where(found, rec["user_cap"], np.inf).astype(np.float64),
        cluster_id=np.where(found, rec["cluster_id"], NO_CLUSTER).astype(np.int64),
        known=found,
        entities=[[] for _ in range(len(found))],
    )


@dataclass
class Applicant:
    """A user the model has never seen: raw features (NaN = missing), limit, links, decision time."""

    user_id: Any
    raw: np.ndarray  # float64 [F], the model's feature order
    limit: float
    as_of: float  # days since 1970
    links: list[tuple[str, Any, float]]  # (entity_type, entity_id, ts in days)


def for_applicants(
    bundle: ScoringBundle, snapshot: Snapshot, applicants: list[Applicant]
) -> Context:
    """Contexts of applicants from their own data and the stored records of their entities.

    A link counts when it was seen inside the applicant's window ``[as_of - W, as_of]``; an
    entity unknown to the snapshot is new (no co-users); an entity with more than its type's
    ``max_degree`` distinct users by then (the stored count plus the applicant) is a super-node
    and cut, exactly as in batch. The hop tokens are the model's last hop layers applied to the
    weighted means of the entities' stored sums.
    """
    inf = bundle.inference
    n, (_, hops, d) = len(applicants), inf.token_shape
    type_code, max_degree, high = bundle.type_tables
    # each applicant's distinct entities (the response lists them); those seen in the window
    # are read from the snapshot, all of them in one read
    used: list[list[dict]] = []
    keys: list[str] = []
    owner: list[int] = []
    codes: list[int] = []
    entries: list[dict] = []
    for i, app in enumerate(applicants):
        seen: dict[str, dict] = {}
        lo, hi = app.as_of - bundle.history_days, app.as_of
        for etype, eid, ts in app.links:
            if etype not in type_code:
                raise ValueError(f"entity type {etype!r} is unknown to this model")
            key = bundle.key(etype, eid)
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = {
                    "entity_type": etype,
                    "key": key,
                    "in_window": False,
                    "known": False,
                    "neighbours": 0,
                    "cut": False,
                }
            entry["in_window"] = entry["in_window"] or lo <= ts <= hi
        used.append(list(seen.values()))
        for entry in used[-1]:
            if entry["in_window"]:
                keys.append(entry["key"])
                owner.append(i)
                codes.append(type_code[entry["entity_type"]])
                entries.append(entry)
    n_types = len(bundle.entity_types)
    pairs = np.zeros((n, n_types))
    wsum = np.zeros(n)
    sums = np.zeros((n, 2 * hops * d))
    cluster_room = np.full(n, np.inf)
    cluster_of = np.full(n, NO_CLUSTER, dtype=np.int64)
    if keys:
        rec, found = snapshot.entities(keys)
        own = np.asarray(owner, np.int64)
        code = np.asarray(codes, np.int64)
        n_window = rec["n_window"].astype(np.float64)
        # the applicant makes an entity one user more: above its type's cut-off it is cut
        cut = found & (rec["n_cumulative"].astype(np.int64) + 1 > max_degree[code])
        live = found & ~cut
        w = bundle.type_weights[code]
        np.add.at(pairs, (own[live], code[live]), n_window[live])
        wsum += np.bincount(own[live], weights=(w * n_window)[live], minlength=n)
        np.add.at(
            sums,
            own[live],
            w[live, None] * rec["sums"][live].reshape(int(live.sum()), 2 * hops * d),
        )
        clustered = live & high[code] & (rec["cluster_id"] >= 0)
        for j, entry in enumerate(entries):
            entry["known"] = bool(found[j])
            entry["cut"] = bool(cut[j])
            if live[j]:
                entry["neighbours"] = int(rec["n_window"][j])
            if clustered[j]:
                entry["cluster_id"] = int(rec["cluster_id"][j])
        if clustered.any() and snapshot.caps_present:
            ids = np.unique(rec["cluster_id"][clustered])
            crec, cfound = snapshot.clusters(ids)
            room = dict(
                zip(
                    ids[cfound].tolist(),
                    (crec["cap"] - crec["granted"])[cfound].tolist(),
                    strict=True,
                )
            )
            # an applicant takes the tightest room of the clusters its entities belong to
            for j in np.flatnonzero(clustered):
                c, i = int(rec["cluster_id"][j]), own[j]
                if c in room and room[c] < cluster_room[i]:
                    cluster_room[i], cluster_of[i] = max(room[c], 0.0), c
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(wsum[:, None] > 0, sums / wsum[:, None], 0.0)
    tokens = inf.tokens_from_means(means.reshape(n, 2, hops, d), wsum)
    return Context(
        user_id=np.array([a.user_id for a in applicants], dtype=object),
        raw=np.stack([np.asarray(a.raw, np.float64) for a in applicants])
        if n
        else np.zeros((0, len(bundle.feature_names))),
        limit=np.array([a.limit for a in applicants], np.float64),
        as_of=np.array([a.as_of for a in applicants], np.float64),
        struct=struct_from_pairs(pairs, bundle.type_weights),
        tokens=tokens,
        user_cap=cluster_room,
        cluster_id=cluster_of,
        known=np.zeros(n, bool),
        entities=used,
    )


def cap_or_none(value: float) -> float | None:
    return None if math.isinf(value) else float(value)
