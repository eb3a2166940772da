"""cluster.yaml passes Ray's own cluster-launcher validation and installs this package."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[.*\])?==(.+)$", d)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _validated(cfg: dict) -> dict:
    """What ``ray up`` does before touching the cloud: fill defaults, merge, validate."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_validates_cluster_yaml(raw):
    cfg = _validated(raw)
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert cfg["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["cpu_worker"]["min_workers"] >= 1
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"]
    assert types["gpu_worker"]["min_workers"] == 0 < types["gpu_worker"]["max_workers"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    mins = sum(t.get("min_workers", 0) for n, t in types.items() if n != "head")
    assert mins <= cfg["max_workers"]
    assert cfg["provider"]["type"] == "aws"


def test_every_node_installs_the_package_with_torch_pinned(raw):
    cfg = _validated(raw)
    pins = _pins()
    repo = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    per_type = {
        "head": cfg["head_setup_commands"],
        "cpu_worker": cfg["worker_setup_commands"],
        "gpu_worker": cfg["available_node_types"]["gpu_worker"]["worker_setup_commands"],
    }
    for name, cmds in per_type.items():
        torch = [i for i, c in enumerate(cmds) if f'"torch=={pins["torch"]}"' in c]
        pkg = [
            i for i, c in enumerate(cmds) if re.search(rf"pip install .*-e {re.escape(repo)}$", c)
        ]
        assert torch and pkg, f"{name}: {cmds}"
        assert torch[0] < pkg[0], f"{name}: torch must be pinned before the package pulls it"
    assert "download.pytorch.org/whl/cpu" in " ".join(per_type["cpu_worker"])
    assert "whl/cpu" not in " ".join(per_type["gpu_worker"])
    # the Ray images match the Ray version pyproject.toml pins
    images = [
        cfg["docker"]["image"],
        raw["available_node_types"]["gpu_worker"]["docker"]["worker_image"],
    ]
    assert all(f"ray:{pins['ray']}-py311" in im for im in images), images


def test_validation_rejects_broken_configs(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["cpu_worker"]["min_wrokers"] = 1  # a typo
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _validated(bad)
    bad = copy.deepcopy(raw)
    bad["max_workers"] = 0  # below the sum of min_workers
    with pytest.raises(ValueError, match="max_workers"):
        _validated(bad)
