"""``creditgraph build``: a validated dataset -> the leak-free heterograph arrays in ``RUN/graph``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.data.load import PROGRESS_MIN_ROWS, Dataset, load_dataset
from creditgraph.graph.config import GraphConfig
from creditgraph.graph.entities import entity_keys, new_salt
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.graph.temporal import structural_features, temporal_user_edges
from creditgraph.layout import GraphFiles, RunLayout, as_layout
from creditgraph.utils.io import atomic_dir, fingerprint, path_signature, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

SPLITS = ("train", "val", "test")


def assign_split(ids: np.ndarray, cfg: GraphConfig) -> np.ndarray:
    """Deterministic train/val/test split from a keyed hash of the user id (stable across runs)."""
    h = pd.util.hash_pandas_object(pd.Series(ids), index=False, hash_key=f"{cfg.split_seed:016d}")
    u = (h.to_numpy(np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(
        u < cfg.test_fraction,
        "test",
        np.where(u < cfg.test_fraction + cfg.val_fraction, "val", "train"),
    )


def limit_scale(limits: np.ndarray) -> dict:
    """The training limits' scale, stored with the run: ``policy`` derives the default decision
    grid (up to the 99th percentile) and the cluster caps (multiples of the median) from it."""
    limits = np.asarray(limits, dtype=np.float64)
    pos = limits[limits > 0]
    if pos.size == 0:
        return {"median_positive": None, "q99_positive": None, "zero_share": 1.0}
    return {
        "median_positive": float(np.median(pos)),
        "q99_positive": float(np.quantile(pos, 0.99)),
        "zero_share": float((limits == 0).mean()),
    }


def link_table(links: pd.DataFrame | None, salt: bytes, until: float) -> pd.DataFrame:
    """The user -> entity links stored with the graph (``RUN/graph/links.parquet``).

    One row per validated sighting observed by ``until`` (the run's latest decision time; a later
    sighting can reach no user of the run): ``node`` (user node id), ``entity_type``,
    ``entity_key`` (keyed hash with the run's salt: raw ids are never stored) and ``ts_days``.
    The user-user edges are their two-hop view (``graph/temporal.py``).
    """
    sub = None if links is None else links.loc[links["ts_days"].to_numpy(np.float64) <= until]
    if sub is None or len(sub) == 0:
        return pd.DataFrame(
            {
                "node": np.zeros(0, np.int64),
                "entity_type": np.zeros(0, object),
                "entity_key": np.zeros(0, object),
                "ts_days": np.zeros(0, np.float64),
            }
        )
    return pd.DataFrame(
        {
            "node": sub["user_idx"].to_numpy(np.int64),
            "entity_type": sub["entity_type"].to_numpy(object),
            "entity_key": entity_keys(
                salt, sub["entity_type"].to_numpy(), sub["entity_id"].to_numpy()
            ),
            "ts_days": sub["ts_days"].to_numpy(np.float64),
        }
    )


def input_fingerprint(data_dir: str | Path, cfg: GraphConfig) -> str:
    """Identity of a build: the dataset files (names, sizes, mtimes) and the graph config."""
    return fingerprint(path_signature(data_dir), cfg.model_dump())


def _steps(n_users: int):
    """A bar over the build's steps after validation (off for small datasets)."""
    from tqdm.auto import tqdm

    return tqdm(total=3, unit="step", leave=False, disable=n_users < PROGRESS_MIN_ROWS)


def build_graph(
    data_dir: str | Path, run: RunLayout | str | Path, cfg: GraphConfig | None = None
) -> dict:
    """Validate ``data_dir`` and write ``RUN/graph`` atomically; return a summary."""
    cfg = cfg or GraphConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(data_dir, with_truth=False)
    timings["load_validate"] = time.perf_counter() - t0
    bar = _steps(ds.n_users)

    bar.set_description("build: features")
    t1 = time.perf_counter()
    split = assign_split(ds.ids, cfg)
    raw = ds.feature_matrix()
    std = FeatureStandardizer(cfg.log_skewed, clip_z=cfg.clip_z).fit(
        raw[split == "train"], ds.feature_names
    )
    z, omega = std.transform(raw)
    timings["features"] = time.perf_counter() - t1
    bar.update()

    bar.set_description("build: user-user edges")
    t2 = time.perf_counter()
    edges = temporal_user_edges(ds.links, ds.t_days, ds.spec.entities, ds.spec.history_days)
    struct, struct_names = structural_features(edges, ds.n_users)
    timings["edges"] = time.perf_counter() - t2
    bar.update()

    bar.set_description("build: write")
    t3 = time.perf_counter()
    summary = _write(
        ds,
        as_layout(run),
        cfg,
        split,
        raw,
        z,
        omega,
        (struct, struct_names),
        std,
        edges,
        timings,
        data_dir,
    )
    timings["write"] = time.perf_counter() - t3
    bar.update()
    bar.close()
    log.info(
        "graph: %s users, %d features, %s user-user edges (%d super-nodes cut) in %.1fs",
        f"{ds.n_users:,}",
        len(ds.feature_names),
        f"{edges.stats['edges']:,}",
        edges.stats.get("supernodes_cut", 0),
        sum(timings.values()),
    )
    return summary


def _write(
    ds: Dataset,
    run: RunLayout,
    cfg: GraphConfig,
    split: np.ndarray,
    raw: np.ndarray,
    z: np.ndarray,
    omega: np.ndarray,
    structure: tuple[np.ndarray, list[str]],
    std: FeatureStandardizer,
    edges,
    timings: dict,
    data_dir: str | Path,
) -> dict:
    users = pd.DataFrame(
        {
            "node": np.arange(ds.n_users, dtype=np.int64),
            ds.spec.id: ds.ids,
            "as_of": ds.as_of,
            "t_days": ds.t_days,
            "treatment": ds.treatment,
            "outcome": ds.outcome,
            "split": split,
        }
    )
    manifest = {
        "version": 1,
        "dataset": ds.spec.model_dump(mode="json"),
        "data_dir": str(Path(data_dir).resolve()),
        "fingerprint": input_fingerprint(data_dir, cfg),
        "config": cfg.model_dump(),
        "n_users": ds.n_users,
        "n_features": len(ds.feature_names),
        "feature_names": ds.feature_names,
        "struct_names": structure[1],
        "splits": {s: int((split == s).sum()) for s in SPLITS},
        "labeled": {s: int(((split == s) & np.isfinite(ds.outcome)).sum()) for s in SPLITS},
        "dataset_stats": ds.stats,
        "edges": edges.stats,
        "entity_types": edges.stats.get("entity_types", []),
        "limits": limit_scale(ds.treatment[split == "train"]),
        "timings_s": timings,
    }
    with atomic_dir(run.graph.dir) as tmp_dir:
        tmp = GraphFiles(tmp_dir)
        users.to_parquet(tmp.users, index=False)
        np.savez(tmp.features, raw=raw.astype(np.float32), z=z, omega=omega, struct=structure[0])
        np.savez(
            tmp.edges,
            src=edges.src,
            dst=edges.dst,
            weight=edges.weight,
            etypes=edges.etypes,
        )
        write_json(tmp.feature_stats, std.to_records())
        salt = new_salt(tmp.salt)
        links = link_table(ds.links, salt, float(ds.t_days.max()) if ds.n_users else 0.0)
        links.to_parquet(tmp.links, index=False)
        manifest["links_stored"] = len(links)
        write_json(tmp.manifest, manifest)
    return {
        "run": str(run.root),
        "users": ds.n_users,
        "features": len(ds.feature_names),
        "edges": edges.stats["edges"],
        "supernodes_cut": edges.stats.get("supernodes_cut", 0),
        "splits": manifest["splits"],
    }
