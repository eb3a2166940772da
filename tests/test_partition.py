"""ClusterGCN shards with shadow nodes: coverage, K-hop closure and exact GNN equivalence."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from torch_geometric.nn import SAGEConv

from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.build import build_graph
from creditgraph.graph.config import GraphConfig, PartitionConfig
from creditgraph.graph.partition import load_shard, shard_paths
from creditgraph.utils.io import read_json

HOPS = 2


@pytest.fixture(scope="module")
def dense_run(sim_data, tmp_path_factory):
    """Public IPs are *not* cut here, so the graph is dense enough that METIS must cut edges."""
    from creditgraph.graph.partition import partition_graph

    root = tmp_path_factory.mktemp("dense")
    data = root / "data"
    shutil.copytree(sim_data, data)
    spec = yaml.safe_load((data / "dataset.yaml").read_text())
    spec["entities"]["ip"]["max_degree"] = 100_000
    (data / "dataset.yaml").write_text(yaml.safe_dump(spec))
    run = root / "run"
    build_graph(data, run, GraphConfig())
    partition_graph(run, PartitionConfig(num_parts=6, hops=HOPS))
    return run


def _shards(run):
    return [load_shard(p) for p in shard_paths(run)]


def test_owned_sets_cover_every_user_once(dense_run):
    art = GraphArtifacts.load(dense_run)
    owned = np.concatenate([s["nodes"][: int(s["n_owned"])] for s in _shards(dense_run)])
    assert len(owned) == art.n_users
    assert np.array_equal(np.sort(owned), np.arange(art.n_users))


def test_manifest_reports_a_real_cut(dense_run):
    m = read_json(dense_run / "shards" / "manifest.json")
    assert m["num_parts"] == 6 and m["hops"] == HOPS
    assert 0 < m["edge_cut"] < 1
    assert m["shadow_ratio"] > 0
    assert m["balance"] >= 1
    assert sum(p["owned"] for p in m["parts"]) == GraphArtifacts.load(dense_run).n_users


def test_khop_neighbourhood_is_inside_the_shard(dense_run):
    art = GraphArtifacts.load(dense_run)
    in_nbrs: dict[int, set[int]] = {}
    for s, d in zip(art.src.tolist(), art.dst.tolist(), strict=True):
        in_nbrs.setdefault(d, set()).add(s)
    for shard in _shards(dense_run):
        nodes = set(shard["nodes"].tolist())
        frontier = set(shard["nodes"][: int(shard["n_owned"])].tolist())
        for _ in range(HOPS):
            frontier = {v for u in frontier for v in in_nbrs.get(u, ())}
            assert frontier <= nodes
        # shadow users are marked and carry no ownership
        hop = shard["hop"]
        assert np.all(hop[: int(shard["n_owned"])] == 0) and np.all(
            hop[int(shard["n_owned"]) :] > 0
        )


class TwoLayerSAGE(torch.nn.Module):
    def __init__(self, d_in: int, d: int = 16):
        super().__init__()
        self.c1 = SAGEConv(d_in, d, aggr="mean")
        self.c2 = SAGEConv(d, d, aggr="mean")

    def forward(self, x, edge_index):
        return self.c2(torch.relu(self.c1(x, edge_index)), edge_index)


def test_two_layer_gnn_identical_on_shard_and_full_graph(dense_run):
    torch.manual_seed(0)
    art = GraphArtifacts.load(dense_run)
    x_full = torch.from_numpy(np.concatenate([art.z, art.struct], axis=1))
    ei_full = torch.from_numpy(np.stack([art.src, art.dst]))
    model = TwoLayerSAGE(x_full.shape[1]).eval()
    with torch.no_grad():
        full = model(x_full, ei_full)
        checked = 0
        for shard in _shards(dense_run):
            x = torch.from_numpy(np.concatenate([shard["z"], shard["struct"]], axis=1))
            ei = torch.from_numpy(np.stack([shard["src"], shard["dst"]]))
            out = model(x, ei)
            k = int(shard["n_owned"])
            owned = torch.from_numpy(shard["nodes"][:k])
            torch.testing.assert_close(out[:k], full[owned], rtol=1e-5, atol=1e-5)
            checked += k
    assert checked == art.n_users
