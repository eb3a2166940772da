"""``creditgraph serve``: the online decision API on Ray Serve.

Three deployments behind one FastAPI ingress:

* ``GraphEncoder`` reads the requesting user's record and its one-hop neighbours' stored tokens
  from the embedding store, applies fresh features if given, and runs the last hop (the
  lambda architecture's online half, :class:`~creditgraph.serving.online.LastHopScorer`);
* ``OutcomeTower`` turns tower inputs into risk curves, with dynamic request batching;
* ``DecisionAPI`` (ingress) validates, calls both, and applies the limit policy
  (:func:`~creditgraph.policy.decide.online_decision`) with the user's batch cluster cap.

Endpoints: ``POST /v1/decisions``, ``GET /v1/model``, ``GET /healthz``; OpenAPI at ``/docs``.
Set ``CREDITGRAPH_API_TOKEN`` to require ``Authorization: Bearer <token>``.
"""

# No `from __future__ import annotations` here: FastAPI must see the request model classes
# themselves on the endpoint signatures, which Ray Serve's ingress re-binds.
import hmac
import math
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from ray import serve

TOKEN_ENV = "CREDITGRAPH_API_TOKEN"
MAX_BODY_BYTES = 64 * 1024
MAX_GRID_POINTS = 1001

Finite = Annotated[float, Field(allow_inf_nan=False)]


class GridSpec(BaseModel):
    """A grid of limits: ``start, start + step, ..., <= stop``."""

    model_config = ConfigDict(extra="forbid")

    start: Finite = Field(0.0, ge=0)
    stop: Finite = Field(..., gt=0)
    step: Finite = Field(..., gt=0)

    @model_validator(mode="after")
    def _size(self) -> "GridSpec":
        if self.stop < self.start:
            raise ValueError("grid.stop must be >= grid.start")
        n = math.floor((self.stop - self.start) / self.step + 1e-9) + 1
        if n > MAX_GRID_POINTS:
            raise ValueError(f"grid has {n} points; at most {MAX_GRID_POINTS} are allowed")
        return self

    def values(self) -> np.ndarray:
        n = math.floor((self.stop - self.start) / self.step + 1e-9) + 1
        return self.start + self.step * np.arange(n)


class DecisionRequest(BaseModel):
    """``POST /v1/decisions``: decide a limit for one known user."""

    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr | StrictInt
    features: dict[str, Finite | None] | None = Field(
        None, description="fresh raw feature values (null = missing); others come from the store"
    )
    r_max: Finite | None = Field(None, gt=0, lt=1, description="risk ceiling (default: policy)")
    grid: GridSpec | None = None


class ServeArgs(BaseModel):
    """Arguments of the application builder (``serve/config.yaml``: ``args``)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str
    store_uri: str | None = None
    rules_dir: str | None = None
    policy_config: str | None = Field(
        None, description="pipeline.yaml whose `policy` section applies"
    )


def _policy(args: ServeArgs):
    from creditgraph.config import PipelineConfig

    return PipelineConfig.load(args.policy_config).policy


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class GraphEncoder:
    """Last hop of the graph model for one user, from the embedding store."""

    def __init__(self, run_dir: str, store_uri: str | None = None, rules_dir: str | None = None):
        import torch

        from creditgraph.causal.pretrain import PretrainArtifacts
        from creditgraph.graph.features import FeatureStandardizer
        from creditgraph.model.artifact import load_model
        from creditgraph.model.predict import DSLStats
        from creditgraph.serving.embed import default_store_uri
        from creditgraph.serving.online import LastHopScorer
        from creditgraph.serving.store import open_store
        from creditgraph.utils.io import read_json

        torch.set_num_threads(1)
        run = Path(run_dir).resolve()
        model, _ = load_model(run / "model")
        stats = read_json(run / "graph" / "feature_stats.json")
        self.scorer = LastHopScorer(
            model,
            FeatureStandardizer.from_records(
                stats, clip_z=read_json(run / "graph" / "manifest.json")["config"]["clip_z"]
            ),
            PretrainArtifacts.load(run).teacher() if model.prior_dim else None,
            DSLStats.load(run / "model"),
        )
        self.store = open_store(store_uri or default_store_uri(run))
        self.meta = self.store.get_json("meta") or {}
        self.features = list(self.meta.get("feature_names", []))
        self.index = {f: i for i, f in enumerate(self.features)}
        self.rules = None
        if rules_dir:
            from creditgraph.rules import ConstrainedRuleSet

            self.rules = ConstrainedRuleSet.load(rules_dir)

    def encode(
        self, user_id: str | int, features: dict[str, float | None] | None
    ) -> dict[str, Any]:
        from creditgraph.serving.online import Neighbourhood

        node_arr = self.store.get_array("node", user_id)
        if node_arr is None:
            return {"error": "unknown_user"}
        node = int(node_arr[0])
        rec = self.store.get_array("user", node)
        nf = len(self.features)
        raw, treatment, struct = rec[:nf].astype(np.float64), float(rec[nf]), rec[nf + 1 :]
        for name, value in (features or {}).items():
            raw[self.index[name]] = np.nan if value is None else value
        nbr = self.store.get_array("nbr", node)
        weights = self.store.get_array("nbrw", node)
        states = self.store.get_arrays("state", nbr) if len(nbr) else []
        hood = Neighbourhood(
            counts=np.array([len(nbr)]),
            weights=weights.astype(np.float32),
            states=np.stack(states) if len(nbr) else np.zeros((0, self.scorer.width), np.float32),
        )
        enc = self.scorer.encode(raw[None, :], np.array([treatment]), struct[None, :], hood)
        unc = self.store.get_array("unc", node)
        dsl = self.scorer.dsl(
            enc["completeness"], enc["rep"], unc if unc is not None else np.zeros(1)
        )
        cap = self.store.get_array("cap", node)
        rule = None
        if self.rules is not None:
            import pandas as pd

            rule = self.rules.match(pd.DataFrame(raw[None, :], columns=self.features))[0]
        return {
            "x": enc["x"][0],
            "dsl_score": float(dsl[0]),
            "user_cap": None if cap is None or not np.isfinite(cap[0]) else float(cap[0]),
            "cluster_id": -1 if cap is None else int(cap[1]),
            "rule": None
            if rule is None or (isinstance(rule, float) and math.isnan(rule))
            else str(rule),
        }


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class OutcomeTower:
    """Risk curves from tower inputs, batched across concurrent requests."""

    def __init__(self, run_dir: str):
        import torch

        from creditgraph.model.artifact import load_model

        torch.set_num_threads(1)
        self.model, _ = load_model(Path(run_dir).resolve() / "model")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def curves(self, items: list[tuple[np.ndarray, tuple[float, ...]]]) -> list[np.ndarray]:
        import torch

        x = torch.from_numpy(np.stack([np.asarray(i[0], np.float32) for i in items]))
        with torch.no_grad():
            params = self.model.outcome.params(x)
            out = []
            for row, (_, grid) in enumerate(items):
                g = torch.tensor(grid, dtype=torch.float32)
                out.append(
                    torch.sigmoid(self.model.curve_logits(params[row : row + 1], g))[0].numpy()
                )
        return out


api = FastAPI(
    title="creditgraph decisions",
    description="Causal risk curves and credit-limit decisions for known users.",
    version="1",
)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may be NaN or huge)."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer token (when configured) and a bound on the request body size."""
    token = os.environ.get(TOKEN_ENV)
    if token and not request.url.path.endswith("/healthz"):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"detail": "missing or invalid bearer token"}, status_code=401)
    length = request.headers.get("content-length")
    if length is not None and int(length) > MAX_BODY_BYTES:
        return JSONResponse(
            {"detail": f"request body of {length} bytes exceeds {MAX_BODY_BYTES}"}, status_code=413
        )
    return await call_next(request)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class DecisionAPI:
    def __init__(self, encoder, tower, args: dict):
        self.encoder = encoder
        self.tower = tower
        self.args = ServeArgs(**args)
        self.policy = _policy(self.args)
        from creditgraph.serving.embed import default_store_uri
        from creditgraph.serving.store import open_store
        from creditgraph.utils.io import read_json

        run = Path(self.args.run_dir).resolve()
        store = open_store(self.args.store_uri or default_store_uri(run))
        self.meta = store.get_json("meta") or {}
        store.close()
        self.model_meta = read_json(run / "model" / "model.json")["summary"]
        self.features = set(self.meta.get("feature_names", []))

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model")
    def model_info(self) -> dict:
        return {
            "model_version": self.meta.get("model_fingerprint"),
            "graph_version": self.meta.get("graph_fingerprint"),
            "users": self.meta.get("n_users"),
            "features": sorted(self.features),
            "best_val_loss": self.model_meta.get("best_val_loss"),
            "default_r_max": self.policy.r_max,
            "default_grid": self.policy.grid.model_dump(),
        }

    @api.post("/v1/decisions")
    async def decide(self, req: DecisionRequest) -> dict:
        from creditgraph.policy.decide import online_decision

        unknown = sorted(set(req.features or {}) - self.features)
        if unknown:
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["body", "features", unknown[0]],
                        "msg": f"unknown feature(s) {unknown}",
                        "type": "value_error",
                    }
                ],
            )
        enc = await self.encoder.encode.remote(req.user_id, req.features)
        if enc.get("error") == "unknown_user":
            raise HTTPException(status_code=404, detail=f"unknown user {req.user_id!r}")
        grid = req.grid.values() if req.grid else self.policy.grid.values()
        curve = await self.tower.curves.remote((enc["x"], tuple(float(g) for g in grid)))
        d = online_decision(
            curve,
            grid,
            r_max=req.r_max,
            dsl_score=enc["dsl_score"],
            user_cap=enc["user_cap"],
            guardrail_rule=enc["rule"],
            cluster_id=enc["cluster_id"],
            config=self.policy,
        )
        return {
            "user_id": req.user_id,
            "limit": d.limit,
            "p_default_at_limit": d.p_default_at_limit,
            "binding_constraint": d.binding_constraint,
            "dsl_score": d.dsl_score,
            "rule": d.rule,
            "cluster_id": d.cluster_id,
            "r_max": self.policy.r_max if req.r_max is None else req.r_max,
            "curve": {"limit": [float(g) for g in grid], "p_default": [float(p) for p in curve]},
            "model_version": self.meta.get("model_fingerprint"),
        }


def build_app(
    args: dict, replicas: int | None = None, ingress_env: dict[str, str] | None = None
) -> serve.Application:
    """Application builder for ``serve run serve/config.yaml`` / ``serve deploy``.

    ``replicas`` fixes every deployment's replica count (instead of the config's autoscaling);
    ``ingress_env`` sets environment variables of the ingress replicas (e.g. the API token).
    """
    a = ServeArgs(**args)
    encoder, tower, ingress = GraphEncoder, OutcomeTower, DecisionAPI
    if replicas is not None:
        encoder = encoder.options(num_replicas=replicas)
        tower = tower.options(num_replicas=replicas)
        ingress = ingress.options(num_replicas=replicas)
    if ingress_env:
        ingress = ingress.options(
            ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": ingress_env}}
        )
    return ingress.bind(
        encoder.bind(a.run_dir, a.store_uri, a.rules_dir), tower.bind(a.run_dir), a.model_dump()
    )
