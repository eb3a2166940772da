"""``creditgraph score``: elastic batch rescoring with Ray Data.

users (any number of parquet files, validated) -> ``map_batches`` on an autoscaling actor pool
(each actor holds the model and a read handle on the embedding store once) -> risk curves, DSL
scores and the limit each user would get before cluster caps -> per-cluster caps allocated on the
driver from those limits (a few numbers per user) -> final decisions -> ``OUT/curves.parquet``
(user_id, limit, p_default) and ``OUT/decisions.parquet``, written to a temporary folder and
renamed, so a crashed run leaves nothing at ``OUT``. Standardization statistics, graph context
and uncertainty references all come from the training run and its embedding store; nothing is
re-fitted on the scoring batch. The per-user caps are written back to the store for the online
service.
"""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.config import PipelineConfig
from creditgraph.data.errors import DataValidationError
from creditgraph.policy.config import PolicyConfig
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


class _ScoreActor:
    """Ray Data actor: one model and one store handle, many batches of users."""

    def __init__(
        self,
        run_dir: str,
        store_uri: str,
        grid: list[float],
        policy: dict,
        rules_dir: str | None,
        fail_after: int | None = None,
    ):
        import ray
        import torch

        from creditgraph.causal.pretrain import PretrainArtifacts
        from creditgraph.graph.features import FeatureStandardizer
        from creditgraph.model.artifact import load_model
        from creditgraph.model.predict import DSLStats
        from creditgraph.serving.online import LastHopScorer
        from creditgraph.serving.store import open_store
        from creditgraph.utils.io import read_json

        torch.set_num_threads(1)
        self.node_id = ray.get_runtime_context().get_node_id()  # reported per user: "scored_on"
        run = Path(run_dir)
        model, _ = load_model(run / "model")
        graph = read_json(run / "graph" / "manifest.json")
        std = FeatureStandardizer.from_records(
            read_json(run / "graph" / "feature_stats.json"), clip_z=graph["config"]["clip_z"]
        )
        teacher = PretrainArtifacts.load(run).teacher() if model.prior_dim else None
        self.scorer = LastHopScorer(model, std, teacher, DSLStats.load(run / "model"))
        self.store = open_store(store_uri)
        self.grid = np.asarray(grid, dtype=np.float64)
        self.policy = PolicyConfig(**policy)
        self.features = graph["feature_names"]
        self.rules = None
        if rules_dir:
            from creditgraph.rules import ConstrainedRuleSet

            self.rules = ConstrainedRuleSet.load(rules_dir)
        self.calls = 0
        self.fail_after = fail_after  # fault injection for tests: crash after this many batches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from creditgraph.policy.decide import decide
        from creditgraph.serving.online import Neighbourhood

        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError(
                f"simulated crash of a scoring actor after {self.fail_after} batches"
            )
        ids = batch["user_id"]
        nodes_raw = self.store.get_arrays("node", ids)
        known = np.array([a is not None for a in nodes_raw])
        nodes = np.array([-1 if a is None else int(a[0]) for a in nodes_raw], dtype=np.int64)
        raw = np.stack([np.asarray(batch[f], dtype=np.float64) for f in self.features], axis=1)
        treatment = np.asarray(batch["treatment"], dtype=np.float64)
        kn = nodes[known]
        recs = self.store.get_arrays("user", kn)
        nf = len(self.features)
        struct = np.stack([r[nf + 1 :] for r in recs]) if len(kn) else np.zeros((0, 0), np.float32)
        nbrs = self.store.get_arrays("nbr", kn)
        weights = self.store.get_arrays("nbrw", kn)
        flat = np.concatenate(nbrs) if len(kn) else np.zeros(0, np.int64)
        uniq, inv = np.unique(flat, return_inverse=True)
        states = (
            np.stack(self.store.get_arrays("state", uniq))
            if len(uniq)
            else np.zeros((0, self.scorer.width), np.float32)
        )
        hood = Neighbourhood(
            counts=np.array([len(a) for a in nbrs], dtype=np.int64),
            weights=np.concatenate(weights).astype(np.float32)
            if len(kn)
            else np.zeros(0, np.float32),
            states=states[inv] if len(flat) else np.zeros((0, self.scorer.width), np.float32),
        )
        enc = self.scorer.encode(raw[known], treatment[known], struct, hood)
        unc = np.array([u[0] for u in self.store.get_arrays("unc", kn)], dtype=np.float64)
        dsl = self.scorer.dsl(enc["completeness"], enc["rep"], unc)
        curves = self.scorer.curves(enc["x"], self.grid)
        hits = None
        if self.rules is not None:
            hits = self.rules.match(pd.DataFrame(raw[known], columns=self.features))
        pre_cap = decide(curves, self.grid, dsl_score=dsl, guardrail_hits=hits, config=self.policy)
        n = len(ids)
        full_curves = np.full((n, len(self.grid)), np.nan, np.float32)
        full_curves[known] = curves
        out = {
            "user_id": ids,
            "node": nodes,
            "known": known,
            "curve": full_curves,
            "dsl_score": _fill(n, known, dsl),
            "demand": _fill(n, known, pre_cap.limit),
            "rule": np.full(n, "", dtype=object),  # "" = no rule (keeps the column a string column)
            "scored_on": np.full(n, self.node_id, dtype=object),
        }
        if hits is not None:
            out["rule"][known] = np.array(
                ["" if h is None or h != h else str(h) for h in hits], dtype=object
            )
        return out


def _fill(n: int, mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[mask] = values
    return out


def _decide_rows(batch: dict[str, np.ndarray], grid: list[float], policy: dict) -> pd.DataFrame:
    """Final decisions of a batch with the per-user cluster caps already allocated."""
    from creditgraph.policy.decide import decide_with_caps

    table = decide_with_caps(
        np.asarray(batch["curve"], dtype=np.float64),
        np.asarray(grid),
        dsl_score=batch["dsl_score"],
        user_cap=batch["user_cap"],
        cluster_id=batch["cluster_id"].astype(np.int64),
        guardrail_hits=[r if r else None for r in batch["rule"]],
        config=PolicyConfig(**policy),
    )
    frame = table.to_frame(batch["user_id"])
    frame["binding_constraint"] = frame["binding_constraint"].astype("string")
    return frame


def _long_curves(batch: dict[str, np.ndarray], grid: list[float]) -> dict[str, np.ndarray]:
    g = np.asarray(grid, dtype=np.float64)
    curves = np.asarray(batch["curve"], dtype=np.float32)
    return {
        "user_id": np.repeat(batch["user_id"], len(g)),
        "limit": np.tile(g, len(curves)),
        "p_default": curves.reshape(-1),
    }


def score_users(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    grid: np.ndarray | None = None,
    r_max: float | None = None,
    store_uri: str | None = None,
    rules_dir: str | None = None,
    skip_unknown: bool = False,
    min_actors: int = 1,
    max_actors: int = 2,
    batch_size: int = 4096,
    _fail_after: int | None = None,
) -> dict:
    """Score every user of ``data_dir`` with the model of ``run_dir``; write ``out_dir``.

    ``_fail_after`` makes every scoring actor crash after that many batches (fault injection for
    the atomic-output test).
    """
    import ray
    import ray.data

    from creditgraph.data.load import load_dataset
    from creditgraph.policy.clusters import clusters_for_dataset
    from creditgraph.policy.decide import allocate_cluster_caps, check_grid
    from creditgraph.serving.embed import build_embeddings, default_store_uri
    from creditgraph.utils.io import read_json
    from creditgraph.utils.runtime import init_ray

    init_ray()
    t0 = time.perf_counter()
    cfg = cfg or PipelineConfig()
    policy = cfg.policy if r_max is None else cfg.policy.model_copy(update={"r_max": r_max})
    grid = check_grid(policy.grid.values() if grid is None else grid)
    run = Path(run_dir).resolve()
    uri = store_uri or default_store_uri(run)
    model_fp = read_json(run / "model" / "model.json")["summary"]["fingerprint"]
    meta = _store_meta(uri)
    if meta is None or meta.get("model_fingerprint") != model_fp:
        log.info("embedding store %s missing or stale: building it", uri)
        build_embeddings(run, uri)

    ds_in = load_dataset(data_dir, with_truth=False)  # validated, read through Ray Data
    graph = read_json(run / "graph" / "manifest.json")
    missing = sorted(set(graph["feature_names"]) - set(ds_in.feature_names))
    if missing:
        raise DataValidationError(
            str(data_dir), missing[0], f"feature columns of the model are absent: {missing}"
        )
    id_col = ds_in.spec.id
    table = pd.DataFrame({"user_id": ds_in.users[id_col].to_numpy(), "treatment": ds_in.treatment})
    for f in graph["feature_names"]:
        table[f] = ds_in.users[f].to_numpy()
    clusters = (
        clusters_for_dataset(ds_in, config=policy.clusters) if ds_in.links is not None else None
    )

    blocks = max(1, len(table) // batch_size)
    bounds = np.linspace(0, len(table), blocks + 1).astype(int)
    ds = ray.data.from_pandas([table.iloc[a:b] for a, b in pairwise(bounds)])
    scored = ds.map_batches(
        _ScoreActor,
        fn_constructor_kwargs={
            "run_dir": str(run),
            "store_uri": uri,
            "grid": grid.tolist(),
            "policy": policy.model_dump(),
            "rules_dir": rules_dir,
            "fail_after": _fail_after,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=1,
    ).materialize()

    small = scored.select_columns(["user_id", "known", "demand", "scored_on"]).to_pandas()
    per_node = small["scored_on"].value_counts()
    small = small.set_index("user_id").reindex(table["user_id"]).reset_index()
    unknown = ~small["known"].to_numpy(bool)
    if unknown.any() and not skip_unknown:
        rows = np.flatnonzero(unknown)[:5]
        raise DataValidationError(
            str(Path(data_dir) / ds_in.spec.users),
            id_col,
            "users unknown to the trained graph (score them with --skip-unknown, or retrain)",
            rows=rows.tolist(),
            examples=[repr(table["user_id"].iloc[r]) for r in rows],
            count=int(unknown.sum()),
        )
    cluster_id = clusters.cluster_id if clusters is not None else np.full(len(table), -1, np.int64)
    demand = np.nan_to_num(small["demand"].to_numpy(), nan=0.0)
    user_cap = allocate_cluster_caps(demand, np.where(unknown, -1, cluster_id), policy.clusters)
    caps = pd.DataFrame(
        {"user_id": table["user_id"], "user_cap": user_cap, "cluster_id": cluster_id}
    )
    caps_ref = ray.put(caps.set_index("user_id"))

    def attach(batch: pd.DataFrame) -> pd.DataFrame:
        c = ray.get(caps_ref).reindex(batch["user_id"])
        batch["user_cap"] = c["user_cap"].to_numpy()
        batch["cluster_id"] = c["cluster_id"].to_numpy()
        return batch

    final = scored.filter(lambda r: bool(r["known"])).map_batches(attach, batch_format="pandas")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        final.map_batches(
            _decide_rows,
            fn_kwargs={"grid": grid.tolist(), "policy": policy.model_dump()},
            batch_format="numpy",
        ).write_parquet(str(tmp / "decisions.parquet"))
        final.map_batches(
            _long_curves, fn_kwargs={"grid": grid.tolist()}, batch_format="numpy"
        ).write_parquet(str(tmp / "curves.parquet"))
        decisions = pd.read_parquet(tmp / "decisions.parquet")
        summary = {
            "users_scored": len(decisions),
            "users_unknown": int(unknown.sum()),
            "grid_points": len(grid),
            "r_max": policy.r_max,
            "mean_limit": float(decisions["limit"].mean()) if len(decisions) else 0.0,
            "binding_constraints": decisions["binding_constraint"].value_counts().to_dict(),
            "clusters": 0 if clusters is None else int(clusters.n_clusters),
            "nodes": {str(k): int(v) for k, v in per_node.items()},  # Ray node id -> users
            "seconds": time.perf_counter() - t0,
        }
        write_json(tmp / "summary.json", summary)
    _write_caps(uri, decisions)
    log.info("scored %s users in %.0fs -> %s", f"{len(decisions):,}", summary["seconds"], out)
    return summary


def _store_meta(uri: str) -> dict | None:
    from creditgraph.serving.store import open_store

    try:
        with open_store(uri) as store:
            return store.get_json("meta")
    except FileNotFoundError:
        return None


def _write_caps(uri: str, decisions: pd.DataFrame) -> None:
    """Per-user cluster caps for the online path (``cap``: [user_cap or inf, cluster_id])."""
    from creditgraph.serving.store import open_store

    with open_store(uri) as reader:
        nodes = reader.get_arrays("node", decisions["user_id"].to_numpy())
    keys = np.array([int(n[0]) for n in nodes], dtype=np.int64)
    cap = np.nan_to_num(decisions["user_cap"].to_numpy(np.float64), nan=np.inf)
    # float64: the online decision must reproduce the batch's exactly, even next to a grid point
    values = np.stack([cap, decisions["cluster_id"].to_numpy(np.float64)], axis=1)
    with open_store(uri, writable=True) as store:
        store.bulk_load("cap", keys, values)
