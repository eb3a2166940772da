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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.data.spec import EntityType
from creditgraph.graph.entities import entity_key, load_salt
from creditgraph.graph.temporal import struct_from_pairs
from creditgraph.layout import RunLayout, as_layout
from creditgraph.model.infer import Inference
from creditgraph.policy.calibrate import Calibration
from creditgraph.policy.config import PolicyConfig
from creditgraph.policy.decide import DecisionTable, decide_with_caps, exploration_draws
from creditgraph.policy.guarantee import upper_bound
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

    def guarantee(self, r_max: float) -> dict:
        """What the decisions at ``r_max`` rest on: the certified tightening and its statement."""
        cal = self.calibration
        if self.policy.guarantee is None or cal is None:
            return {"certified": False, "lambda": None, "for_r_max": None, "reason": (
                "no guarantee configured" if self.policy.guarantee is None
                else "the run has no calibration stage"
            )}  # fmt: skip
        ceilings = sorted(cal.lambdas)
        usable = [r for r in ceilings if r >= r_max - 1e-12] or [ceilings[-1]]
        r = min(usable, key=lambda c: abs(c - r_max))
        lam = cal.lambdas[r]
        return {
            "certified": lam is not None and abs(r - r_max) < 1e-12,
            "lambda": lam,
            "for_r_max": r,
            "delta": cal.config.get("delta"),
            "alpha": cal.config.get("alpha"),
            "statement": cal.statements[r],
        }

    def bound(self, ev: Evaluated, r_max: float) -> np.ndarray | None:
        """The upper bound the decision at ``r_max`` is judged on (None: the estimate itself)."""
        if self.policy.guarantee is None or self.calibration is None:
            return None
        g = self.guarantee(r_max)
        if g["lambda"] is None:
            return np.ones_like(ev.curves, dtype=np.float64)  # nothing certified: decline all
        return upper_bound(ev.curves, ev.logit_std, g["lambda"])


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


def encode(bundle: ScoringBundle, ctx: Context, h0: np.ndarray | None = None) -> Encoded:
    """The first half of :func:`evaluate`: a context's tower inputs and guardrail hits."""
    fin = bundle.inference.finish(ctx.raw, ctx.limit, ctx.struct, ctx.tokens, h0=h0)
    rule = np.full(len(ctx), None, dtype=object)
    if bundle.rules is not None and len(ctx):
        frame = pd.DataFrame(ctx.raw, columns=bundle.feature_names)
        hits = bundle.rules.match(frame)
        rule = np.array([None if h is None or h != h or h == "" else str(h) for h in hits], object)
    return Encoded(fin.x, fin.rep, fin.completeness, np.asarray(ctx.limit, np.float64), rule)


def tower(bundle: ScoringBundle, enc: Encoded, grid: np.ndarray) -> Evaluated:
    """The second half of :func:`evaluate`: calibrated curves, uncertainty and DSL scores from
    tower inputs (curves and the factual risk pass through the run's calibration)."""
    inf = bundle.inference
    prob_std, _ = inf.uncertainty(enc.x, inf.unc_grid)
    _, logit_std = inf.uncertainty(enc.x, grid)
    cal = bundle.calibration.calibrate if bundle.calibration is not None else np.asarray
    return Evaluated(
        curves=cal(inf.curves(enc.x, grid)),
        logit_std=logit_std,
        p_factual=cal(inf.factual(enc.x, enc.limit)),
        dsl=inf.dsl(enc.completeness, enc.rep, prob_std),
        prob_std=prob_std,
        rule=enc.rule,
        rep=enc.rep,
    )


def evaluate(
    bundle: ScoringBundle, ctx: Context, grid: np.ndarray, h0: np.ndarray | None = None
) -> Evaluated:
    """Curves, uncertainty, DSL scores and guardrail hits of a context (the one scoring path;
    the service runs its two halves, :func:`encode` and :func:`tower`, in two deployments)."""
    return tower(bundle, encode(bundle, ctx, h0), grid)


def exploration_salt(bundle: ScoringBundle, decision_time_days: float) -> str:
    """The exploration draws' salt: the decision date and the policy's seed (one draw per user
    and date, the same in batch and online)."""
    day = int(np.floor(decision_time_days))
    return f"{day}/{bundle.policy.exploration.seed}"


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
    path: batch passes the caps it allocated, online the snapshot's or the cluster's room).

    Feasibility is judged on the certified bound at ``r_max`` (the guarantee), the current limit
    (``ctx.limit``) bounds how far a limit is cut (stability), and users with an id are drawn for
    exploration on ``decision_time`` (days; the snapshot's T)."""
    r = bundle.policy.r_max if r_max is None else float(r_max)
    draws = None
    if decision_time is not None and bundle.policy.exploration.share > 0:
        salt = exploration_salt(bundle, decision_time)
        keys = [None if k is None else str(k) for k in ctx.user_id]
        draws = np.ones((len(ctx), 2)) - 1e-12  # no id (an anonymous applicant): never drawn
        named = [i for i, k in enumerate(keys) if k is not None]
        if named:
            draws[named] = exploration_draws(np.array([keys[i] for i in named]), salt)
    return decide_with_caps(
        ev.curves,
        grid,
        r,
        user_cap=ctx.user_cap if user_cap is None else user_cap,
        dsl_score=ev.dsl,
        cluster_id=ctx.cluster_id,
        guardrail_hits=ev.rule,
        config=bundle.policy,
        bound=bundle.bound(ev, r),
        current=ctx.limit,
        draws=draws,
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
    n_types = len(bundle.entity_types)
    type_code = {t: i for i, t in enumerate(bundle.entity_types)}
    max_degree = np.array(
        [bundle.entities.get(t, EntityType()).max_degree for t in bundle.entity_types]
    )
    high = np.array(
        [bundle.entities.get(t, EntityType()).high_confidence for t in bundle.entity_types]
    )
    used: list[list[dict]] = []
    keys: list[str] = []
    owner: list[int] = []
    for i, app in enumerate(applicants):
        seen: dict[str, dict] = {}
        for etype, eid, ts in app.links:
            if etype not in type_code:
                raise ValueError(f"entity type {etype!r} is unknown to this model")
            key = bundle.key(etype, eid)
            inside = app.as_of - bundle.history_days <= ts <= app.as_of
            entry = seen.setdefault(key, {"entity_type": etype, "key": key, "in_window": False})
            entry["in_window"] = entry["in_window"] or inside
        used.append(list(seen.values()))
        for entry in seen.values():
            if entry["in_window"]:
                keys.append(entry["key"])
                owner.append(i)
    rec, found = snapshot.entities(keys) if keys else (np.zeros(0), np.zeros(0, bool))
    pairs = np.zeros((n, n_types))
    wsum = np.zeros(n)
    sums = np.zeros((n, 2, hops, d))
    cluster_room = np.full(n, np.inf)
    cluster_of = np.full(n, NO_CLUSTER, dtype=np.int64)
    lookup = {(owner[j], keys[j]): j for j in range(len(keys))}
    clusters_to_read: list[int] = []
    for i, entries in enumerate(used):
        for entry in entries:
            j = lookup.get((i, entry["key"]))
            t = type_code[entry["entity_type"]]
            entry.update(known=False, neighbours=0, cut=False)
            if j is None or not found[j]:
                continue
            r = rec[j]
            entry["known"] = True
            if r["n_cumulative"] + 1 > max_degree[t]:  # the applicant makes it one user more
                entry["cut"] = True
                continue
            w = bundle.type_weights[t]
            entry["neighbours"] = int(r["n_window"])
            pairs[i, t] += r["n_window"]
            wsum[i] += w * r["n_window"]
            sums[i] += w * r["sums"]
            if high[t] and r["cluster_id"] >= 0:
                clusters_to_read.append(int(r["cluster_id"]))
                entry["cluster_id"] = int(r["cluster_id"])
    if clusters_to_read and snapshot.caps_present:
        ids = sorted(set(clusters_to_read))
        crec, cfound = snapshot.clusters(ids)
        room = {
            c: (r["cap"] - r["granted"]) for c, r, f in zip(ids, crec, cfound, strict=True) if f
        }
        for i, entries in enumerate(used):
            for entry in entries:
                c = entry.get("cluster_id")
                if c is not None and c in room and room[c] < cluster_room[i]:
                    cluster_room[i], cluster_of[i] = max(room[c], 0.0), c
    tokens = np.zeros((n, 2, hops, d), np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(wsum[:, None, None, None] > 0, sums / wsum[:, None, None, None], 0.0)
    for k in range(hops):
        c, s = inf.hop_from_means(k, means[:, 0, k], means[:, 1, k], wsum)
        tokens[:, 0, k], tokens[:, 1, k] = c, s
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
