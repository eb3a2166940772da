"""``creditgraph serve``: the online decision API on Ray Serve.

Three deployments behind one FastAPI ingress, composed with ``bind``:

* ``GraphEncoder`` follows the snapshot registry's promoted snapshot (switching without a
  restart), reads a known user's record or an applicant's entities from it, and runs the last
  layer (``serving/context.encode``);
* ``OutcomeTower`` turns tower inputs into risk curves, uncertainty and DSL scores, batching
  concurrent requests (``serving/context.tower``);
* ``DecisionAPI`` (ingress) authenticates, validates, applies the server's policy
  (``serving/context.decide``) and writes the decision log.

Endpoints: ``POST /v1/decisions`` (a known ``user_id``, or an applicant's ``features``, ``limit``,
``links`` and ``as_of``), ``GET /v1/model``, ``GET /v1/snapshots`` and ``POST /v1/admin/snapshot``
(admin), ``GET /healthz``; OpenAPI at ``/docs``.

Security: a bearer token is required on every endpoint but ``/healthz``: ``CREDITGRAPH_API_TOKEN``
(role ``decide``) and ``CREDITGRAPH_ADMIN_TOKEN`` (role ``admin``). Without a token the service
refuses to start unless it is explicitly run open (``insecure: true``, ``creditgraph serve
--insecure``), which it logs loudly and reports on ``/v1/model``. The policy (grid, ceiling, caps,
guarantee) is the server's: a caller may only ask for a *lower* ceiling, down to the policy's
``caller_r_max_floor``; only the admin role may raise it or send a grid.
"""

# No `from __future__ import annotations` here: FastAPI must see the request model classes
# themselves on the endpoint signatures, which Ray Serve's ingress re-binds.
import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from ray import serve

from creditgraph.config import PipelineConfig
from creditgraph.layout import RunLayout
from creditgraph.policy.config import GridConfig
from creditgraph.serving.context import (
    Applicant,
    Context,
    Encoded,
    Evaluated,
    ScoringBundle,
    decide,
    encode,
    for_applicants,
    read_known,
    tower,
)
from creditgraph.serving.decision_log import DecisionLog, input_hash
from creditgraph.serving.snapshot import Registry, SnapshotError

TOKEN_ENV = "CREDITGRAPH_API_TOKEN"
ADMIN_TOKEN_ENV = "CREDITGRAPH_ADMIN_TOKEN"
MAX_BODY_BYTES = 64 * 1024
MAX_LINKS = 64
MAX_ID_CHARS = 128
EPOCH = pd.Timestamp("1970-01-01")

log = logging.getLogger("creditgraph.serving.app")

Finite = Annotated[float, Field(allow_inf_nan=False)]
Amount = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e15)]
Id = StrictStr | StrictInt


class Link(BaseModel):
    """An applicant was seen with an entity (device, phone, address, IP...) at ``ts``."""

    model_config = ConfigDict(extra="forbid")

    entity_type: StrictStr = Field(..., max_length=64)
    entity_id: Id
    ts: str | None = Field(None, description="ISO time; default: the request's as_of")


class DecisionRequest(BaseModel):
    """``POST /v1/decisions``: a known user by id, or an applicant by its data."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = Field(None, description="a user of the served snapshot")
    applicant: bool = Field(
        False, description="decide the payload as a new applicant even if user_id is known"
    )
    features: dict[str, Finite | None] | None = Field(
        None, description="raw feature values (null = missing); for a known user: fresh values"
    )
    limit: Amount | None = Field(
        None, description="current limit (an applicant: default 0; a known user: the snapshot's)"
    )
    links: list[Link] | None = Field(None, max_length=MAX_LINKS)
    as_of: str | None = Field(None, description="decision time (ISO); default: now")
    r_max: Finite | None = Field(
        None, gt=0, lt=1, description="a lower ceiling than the policy's (admin: any)"
    )
    grid: GridConfig | None = Field(None, description="admin only: another grid of limits")

    @model_validator(mode="after")
    def _who(self) -> "DecisionRequest":
        if self.user_id is None and self.features is None:
            raise ValueError("give a user_id (known user) or features (an applicant)")
        if isinstance(self.user_id, str) and len(self.user_id) > MAX_ID_CHARS:
            raise ValueError(f"user_id longer than {MAX_ID_CHARS} characters")
        return self


class SnapshotAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["promote", "rollback"]
    id: StrictStr | None = None


class ServeArgs(BaseModel):
    """Arguments of the application builder (``serve/config.yaml``: ``args``)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str
    snapshots: str | None = Field(None, description="snapshot registry; default RUN.snapshots")
    rules_dir: str | None = None
    policy_config: str | None = Field(None, description="pipeline.yaml whose `policy` applies")
    decision_log: str | None = Field(None, description="default: REGISTRY/decision_log")
    insecure: bool = Field(False, description="serve without authentication (local development)")
    replicas: int | None = Field(None, ge=1, description="fixed replicas instead of autoscaling")


def _bundle(args: ServeArgs) -> ScoringBundle:
    policy = PipelineConfig.load(args.policy_config).policy
    return ScoringBundle.load(args.run_dir, policy, args.rules_dir)


def _registry(args: ServeArgs) -> Registry:
    return Registry.for_run(RunLayout(Path(args.run_dir)), args.snapshots)


def _days(text: str | None, field: str) -> float:
    """ISO time to days since 1970 (naive = UTC); a 422 naming the field when unparseable."""
    if text is None:
        return (pd.Timestamp.now(tz="UTC").tz_localize(None) - EPOCH) / pd.Timedelta(days=1)
    try:
        t = pd.Timestamp(text)
    except (ValueError, TypeError) as exc:
        raise _unprocessable(field, f"not an ISO time: {exc}") from exc
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    return (t - EPOCH) / pd.Timedelta(days=1)


def _unprocessable(field: str | list, msg: str) -> HTTPException:
    loc = ["body", *field] if isinstance(field, list) else ["body", field]
    return HTTPException(422, detail=[{"loc": loc, "msg": msg, "type": "value_error"}])


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class GraphEncoder:
    """Reads the promoted snapshot and runs the last layer for one request."""

    def __init__(self, args: dict):
        import torch

        torch.set_num_threads(1)
        self.args = ServeArgs(**args)
        self.bundle = _bundle(self.args)
        self.registry = _registry(self.args)
        self.snapshot = None
        self._pointer_seen: tuple[float, int] | None = None
        self._checked = 0.0
        self.index = {f: i for i, f in enumerate(self.bundle.feature_names)}
        self._follow(force=True)

    def _follow(self, force: bool = False) -> None:
        """Switch to the promoted snapshot when the registry's pointer changed (checked at most
        every 0.5 s: one ``stat``)."""
        now = time.monotonic()
        if not force and now - self._checked < 0.5:
            return
        self._checked = now
        path = self.registry.layout.current
        try:
            st = path.stat()
            seen = (st.st_mtime, st.st_ino)
        except FileNotFoundError:
            seen = None
        if not force and seen == self._pointer_seen:
            return
        current = self.registry.current()
        if current is not None and (self.snapshot is None or self.snapshot.id != current):
            snap = self.registry.open(current)
            if snap.meta["model_version"] != self.bundle.model_version:
                snap.close()
                raise SnapshotError(
                    f"snapshot {current} was made with model {snap.meta['model_version']}, the "
                    f"service runs {self.bundle.model_version}"
                )
            old, self.snapshot = self.snapshot, snap
            if old is not None:
                old.close()
        self._pointer_seen = seen

    def info(self) -> dict:
        self._follow()
        snap = self.snapshot
        return {
            "snapshot": None if snap is None else snap.id,
            "decision_time": None if snap is None else snap.meta["decision_time"],
            "caps_present": False if snap is None else snap.caps_present,
        }

    def encode(self, req: dict) -> dict:
        self._follow()
        snap = self.snapshot
        if snap is None:
            return {"error": "no_snapshot"}
        b = self.bundle
        applicant = req["user_id"] is None or req["applicant"]
        if not applicant:
            ctx = read_known(snap, [req["user_id"]])
            if not ctx.known[0]:
                if req["features"] is None:
                    return {"error": "unknown_user"}
                applicant = True
            else:  # a known user: fresh values given in the request replace the snapshot's
                for name, value in (req["features"] or {}).items():
                    ctx.raw[0, self.index[name]] = np.nan if value is None else value
                if req["limit"] is not None:
                    ctx.limit[0] = req["limit"]
        if applicant:
            raw = np.full(len(b.feature_names), np.nan)
            for name, value in (req["features"] or {}).items():
                raw[self.index[name]] = np.nan if value is None else value
            app = Applicant(
                user_id=req["user_id"],
                raw=raw,
                limit=req["limit"] or 0.0,
                as_of=req["as_of_days"],
                links=[(lk["entity_type"], lk["entity_id"], lk["ts_days"]) for lk in req["links"]],
            )
            ctx = for_applicants(b, snap, [app])
        enc = encode(b, ctx)
        return {
            "encoded": enc,
            "known": bool(ctx.known[0]),
            "user_cap": float(ctx.user_cap[0]),
            "cluster_id": int(ctx.cluster_id[0]),
            "limit": float(ctx.limit[0]),
            "entities": ctx.entities[0],
            "raw": ctx.raw[0],
            "snapshot": snap.id,
            "decision_time_days": snap.meta["decision_time_days"],
            "caps_present": snap.caps_present,
        }


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class OutcomeTower:
    """Risk curves, uncertainty and DSL scores from tower inputs, batched across requests."""

    def __init__(self, args: dict):
        import torch

        torch.set_num_threads(1)
        self.bundle = _bundle(ServeArgs(**args))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def evaluate(self, items: list[tuple[Encoded, tuple[float, ...]]]) -> list[Evaluated]:
        # one tower pass per distinct grid (an admin request may bring its own grid)
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, (_, grid) in enumerate(items):
            groups.setdefault(grid, []).append(i)
        out: list[Evaluated | None] = [None] * len(items)
        for grid, idx in groups.items():
            encs = [items[i][0] for i in idx]
            ev = tower(self.bundle, _stack(encs), np.asarray(grid))
            a = 0
            for i, enc in zip(idx, encs, strict=True):
                b = a + len(enc.x)
                out[i] = _rows(ev, a, b)
                a = b
        return out


def _stack(encs: list[Encoded]) -> Encoded:
    """Several requests' tower inputs as one batch."""
    if len(encs) == 1:
        return encs[0]
    return Encoded(
        x=np.concatenate([e.x for e in encs]),
        rep=np.concatenate([e.rep for e in encs]),
        completeness=np.concatenate([e.completeness for e in encs]),
        limit=np.concatenate([e.limit for e in encs]),
        rule=np.concatenate([e.rule for e in encs]),
    )


def _rows(ev: Evaluated, a: int, b: int) -> Evaluated:
    """Rows ``a:b`` of a batch's evaluation."""
    return Evaluated(
        curves=ev.curves[a:b],
        logit_std=ev.logit_std[a:b],
        p_factual=ev.p_factual[a:b],
        dsl=ev.dsl[a:b],
        prob_std=ev.prob_std[a:b],
        rule=ev.rule[a:b],
        rep=ev.rep[a:b],
    )


api = FastAPI(
    title="creditgraph decisions",
    description="Causal risk curves and credit-limit decisions for known users and new applicants.",
    version="2",
)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may be NaN or huge)."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


class BodyLimit:
    """Reads the whole request body before the app sees it and refuses it above the limit with
    a 413, whether or not a Content-Length was sent (a chunked body is counted as it arrives)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self._refuse(send, size)
            chunks.append(body)
            more = message.get("more_body", False)
        payload = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        response = JSONResponse(
            {"detail": f"request body of at least {size} bytes exceeds {self.limit}"},
            status_code=413,
        )
        await response({"type": "http"}, None, send)


api.add_middleware(BodyLimit)


def _token_fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def caller(request: Request) -> dict:
    """The caller's role and identity from its bearer token (401 without a valid one)."""
    state = request.app.state
    if getattr(state, "insecure", False):
        return {"role": "admin", "identity": "insecure"}
    given = request.headers.get("authorization", "")
    for role, env in (("admin", ADMIN_TOKEN_ENV), ("decide", TOKEN_ENV)):
        token = os.environ.get(env)
        if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return {"role": role, "identity": f"{role}:{_token_fingerprint(token)}"}
    raise HTTPException(401, detail="missing or invalid bearer token")


Caller = Annotated[dict, Depends(caller)]


def _reasons(binding: str, rule: str | None, missing: list[str], cluster_capped: bool) -> list[str]:
    """What a credit officer can pass on about a lowered or declined limit."""
    text = {
        "risk_ceiling": "the estimated default risk reaches the ceiling at higher limits",
        "no_feasible_limit": "the estimated default risk is above the ceiling at every limit",
        "dsl": "important information is missing or the model is uncertain for this user, so a "
        "lower ceiling applies",
        "guardrail": f"a high-risk rule matched ({rule})",
        "cluster_cap": "accounts tied to this one by shared devices, phones or addresses already "
        "hold most of their group's credit",
        "grid_max": "the largest limit on offer",
        "stability": "an existing customer's limit is not cut by more than the policy allows in "
        "one review",
        "exploration": "part of a randomized limit test (the policy's own controlled experiment)",
    }
    out = [text.get(binding, binding)]
    if rule and binding != "guardrail":
        out.append(f"a high-risk rule matched ({rule})")
    if missing:
        out.append("missing important information: " + ", ".join(missing[:5]))
    if cluster_capped and binding != "cluster_cap":
        out.append("the group's remaining credit room caps this limit")
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class DecisionAPI:
    def __init__(self, encoder, tower_handle, args: dict):
        self.encoder = encoder
        self.tower = tower_handle
        self.args = ServeArgs(**args)
        self.bundle = _bundle(self.args)
        self.registry = _registry(self.args)
        self.log = DecisionLog(
            self.args.decision_log or (self.registry.layout.root / "decision_log")
        )
        api.state.insecure = self.args.insecure
        if self.args.insecure:
            log.warning("creditgraph decision API is running WITHOUT authentication (insecure)")
        elif not os.environ.get(TOKEN_ENV) and not os.environ.get(ADMIN_TOKEN_ENV):
            raise RuntimeError(
                f"no API token: set {TOKEN_ENV} (and {ADMIN_TOKEN_ENV} for admins), or run the "
                "service open for local development with --insecure"
            )
        self.features = set(self.bundle.feature_names)
        alpha = self.bundle.inference.model.alpha.numpy()
        self.important = [
            (i, f)
            for i, (f, a) in enumerate(zip(self.bundle.feature_names, np.abs(alpha), strict=True))
            if a >= 0.2
        ]

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self, who: Caller) -> dict:
        info = await self.encoder.info.remote()
        p = self.bundle.policy
        return {
            "model_version": self.bundle.model_version,
            "graph_version": self.bundle.graph_version,
            "features": sorted(self.features),
            "entity_types": self.bundle.entity_types,
            "policy": {
                "r_max": p.r_max,
                "caller_r_max_floor": p.caller_r_max_floor,
                "grid": p.grid.model_dump() if p.grid else None,
            },
            "guarantee": self.bundle.deployed.guarantee(),
            "snapshot": info["snapshot"],
            "decision_time": info["decision_time"],
            "caps_present": info["caps_present"],
            "auth": "off (insecure)" if self.args.insecure else "bearer token",
            "role": who["role"],
        }

    @api.get("/v1/snapshots")
    def snapshots(self, who: Caller) -> dict:
        self._admin(who)
        return {"current": self.registry.current(), "snapshots": self.registry.list()}

    @api.post("/v1/admin/snapshot")
    def switch(self, req: SnapshotAction, who: Caller) -> dict:
        self._admin(who)
        try:
            if req.action == "promote":
                if req.id is None:
                    raise _unprocessable("id", "promote needs a snapshot id")
                pointer = self.registry.promote(req.id, by=who["identity"])
            else:
                pointer = self.registry.rollback(by=who["identity"])
        except SnapshotError as exc:
            raise HTTPException(404, detail=str(exc)) from exc
        return {"current": pointer["current"]}

    def _admin(self, who: dict) -> None:
        if who["role"] != "admin":
            raise HTTPException(403, detail="this endpoint needs the admin role")

    @api.post("/v1/decisions")
    async def decide(self, req: DecisionRequest, who: Caller) -> dict:
        b, p = self.bundle, self.bundle.policy
        unknown = sorted(set(req.features or {}) - self.features)
        if unknown:
            raise _unprocessable(["features", unknown[0]], f"unknown feature(s) {unknown}")
        r_max = p.r_max if req.r_max is None else req.r_max
        if who["role"] != "admin":
            if req.grid is not None:
                raise HTTPException(403, detail="the grid is the server's policy (admin only)")
            if req.r_max is not None and not p.caller_r_max_floor <= req.r_max <= p.r_max:
                raise _unprocessable(
                    "r_max",
                    f"a caller may only lower the ceiling: {p.caller_r_max_floor} <= r_max <= "
                    f"{p.r_max}",
                )
        grid = req.grid.values() if req.grid is not None else p.grid_values()
        as_of_days = _days(req.as_of, "as_of")
        links = [
            {
                "entity_type": lk.entity_type,
                "entity_id": lk.entity_id,
                "ts_days": as_of_days if lk.ts is None else _days(lk.ts, "links"),
            }
            for lk in (req.links or [])
        ]
        bad = [lk["entity_type"] for lk in links if lk["entity_type"] not in b.entity_types]
        if bad:
            raise _unprocessable(
                ["links", "entity_type"], f"unknown entity type(s) {sorted(set(bad))}"
            )
        payload = {
            "user_id": req.user_id,
            "applicant": req.applicant,
            "features": req.features,
            "limit": req.limit,
            "as_of_days": as_of_days,
            "links": links,
        }
        enc = await self.encoder.encode.remote(payload)
        if enc.get("error") == "unknown_user":
            raise HTTPException(404, detail=f"unknown user {req.user_id!r} in the served snapshot")
        if enc.get("error") == "no_snapshot":
            raise HTTPException(503, detail="no snapshot promoted yet")
        ev = await self.tower.evaluate.remote((enc["encoded"], tuple(float(g) for g in grid)))
        ctx = Context(
            user_id=np.array([req.user_id], object),
            raw=enc["raw"][None, :],
            limit=np.array([enc["limit"]]),
            as_of=np.array([as_of_days]),
            struct=np.zeros((1, 0), np.float32),
            tokens=np.zeros((1, 0, 0, 0), np.float32),
            user_cap=np.array([enc["user_cap"]]),
            cluster_id=np.array([enc["cluster_id"]], np.int64),
            known=np.array([enc["known"]]),
        )
        table = decide(b, ev, ctx, grid, r_max=r_max, decision_time=enc["decision_time_days"])
        d = table.row(0)
        guarantee = b.deployed.guarantee(r_max)
        missing = [f for i, f in self.important if np.isnan(enc["raw"][i])]
        response = {
            "user_id": req.user_id,
            "known_user": enc["known"],
            "limit": d.limit,
            "p_default_at_limit": d.p_default_at_limit,
            "p_upper_at_limit": None if np.isnan(d.p_upper_at_limit) else d.p_upper_at_limit,
            "guarantee": {k: v for k, v in guarantee.items() if k != "statement"},
            "explored": not np.isnan(d.explore_factor),
            "binding_constraint": d.binding_constraint,
            "reasons": _reasons(d.binding_constraint, d.rule, missing, d.user_cap is not None),
            "dsl_score": d.dsl_score,
            "rule": d.rule,
            "cluster_id": d.cluster_id,
            "user_cap": d.user_cap,
            "caps_applied": enc["caps_present"],
            "r_max": r_max,
            "r_max_effective": d.r_max_effective,
            "curve": {
                "limit": [float(g) for g in grid],
                "p_default": [float(x) for x in ev.curves[0]],
            },
            "entities": [
                {k: v for k, v in e.items() if k != "in_window" or not v} for e in enc["entities"]
            ],
            "snapshot": enc["snapshot"],
            "model_version": b.model_version,
        }
        self.log.append(
            {
                "snapshot": enc["snapshot"],
                "model_version": b.model_version,
                "caller": who["identity"],
                "user_id": req.user_id,
                "inputs_hash": input_hash(
                    {
                        "payload": {k: v for k, v in payload.items() if k != "links"},
                        "entities": [e["key"] for e in enc["entities"]],
                    }
                ),
                "entities": [e["key"] for e in enc["entities"]],
                "limit": d.limit,
                "binding_constraint": d.binding_constraint,
                "reasons": response["reasons"],
                "r_max": r_max,
            }
        )
        return response


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run serve/config.yaml`` / ``serve deploy`` (one dict of
    arguments, Ray Serve's convention) and for ``creditgraph serve``; an order-risk run gets the
    order-risk application (``serving/orders.py``)."""
    a = ServeArgs(**args)
    if RunLayout(Path(a.run_dir)).is_orders:
        from creditgraph.serving.orders import build_orders_app

        return build_orders_app(args)
    encoder, tower_d, ingress = GraphEncoder, OutcomeTower, DecisionAPI
    if a.replicas is not None:
        encoder = encoder.options(num_replicas=a.replicas)
        tower_d = tower_d.options(num_replicas=a.replicas)
        ingress = ingress.options(num_replicas=a.replicas)
    # the API tokens of the environment the application is built in reach the ingress replicas
    # (which may run in worker processes started before they were set)
    tokens = {k: os.environ[k] for k in (TOKEN_ENV, ADMIN_TOKEN_ENV) if os.environ.get(k)}
    if tokens:
        ingress = ingress.options(
            ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": tokens}}
        )
    dumped = a.model_dump()
    return ingress.bind(encoder.bind(dumped), tower_d.bind(dumped), dumped)
