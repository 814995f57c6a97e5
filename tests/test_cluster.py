"""The cluster files parse and name the right node types, resources and entrypoint."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_launcher_has_cpu_and_gpu_workers():
    cfg = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t["resources"].get("GPU")]
    cpu = [
        n for n, t in types.items() if t["resources"].get("CPU") and not t["resources"].get("GPU")
    ]
    assert gpu == ["gpu_workers"] and "cpu_workers" in cpu
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0  # no actors on the head
    assert any("pip install" in c and "tokenizers" in c for c in cfg["setup_commands"])


def test_kuberay_manifest_groups():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay.yaml").read_text()))
    (cluster,) = [d for d in docs if d and d.get("kind") == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu_limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1
    cpu_limits = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits


def test_runtime_env_and_submit_commands():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert {".venv/", "out/", "models/"} <= set(env["excludes"])
    assert "pip" not in env  # nodes carry the dependencies; no per-job torch install
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-") for d in deps} - {"ray"}
    setup = " ".join(
        yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())["setup_commands"]
    )
    setup = setup.lower().replace("_", "-")
    assert all(n in setup for n in names), names
    for doc in ("README.md", "cluster/README.md"):
        text = (REPO / doc).read_text()
        assert "--runtime-env cluster/runtime_env.yaml -- python -m jobs run" in text, doc
