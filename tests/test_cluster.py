"""The cluster files parse, pass Ray's own checks, and name the right resources and entrypoint."""

from __future__ import annotations

import logging
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SUBMIT = "--runtime-env cluster/runtime_env.yaml -- python -m jobs run configs/"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def project_deps() -> list[str]:
    """pyproject's runtime requirements, except ray (the Ray images have it)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=\[ ]", d)[0] != "ray"]


def test_launcher_passes_ray_schema_with_cpu_head_cpu_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("cluster.yaml")
    validate_config(prepare_config(cfg))  # Ray's schema, after its AWS defaults are merged
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no actors on the head
    gpu = types["gpu_workers"]["resources"]
    assert gpu["GPU"] == 1 and gpu["CPU"] >= 1
    assert [k for k in gpu if k.startswith("accelerator_type:")] == ["accelerator_type:A10G"]
    assert types["gpu_workers"]["docker"]["worker_image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert (
        types["cpu_workers"]["resources"]["CPU"] >= 1
        and "GPU" not in types["cpu_workers"]["resources"]
    )
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values()) > 0
    assert cfg["idle_timeout_minutes"] > 0
    # the project (and with it pyproject's pinned dependencies) is installed from the synced repo
    (mount,) = [m for m, local in cfg["file_mounts"].items() if local == "."]
    assert f"pip install -e {mount}" in cfg["setup_commands"]
    assert ".gitignore" in cfg["rsync_filter"]


def test_kuberay_cluster_groups_as_the_autoscaler_sees_them():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    (cr,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cr["apiVersion"] == "ray.io/v1"
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu_pod = groups["gpu-workers"]["template"]["spec"]
    assert gpu_pod["nodeSelector"] and gpu_pod["containers"][0]["image"].endswith("-py311-gpu")
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu_pod = groups["cpu-workers"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert cpu_pod["containers"][0]["image"] == "rayproject/ray:2.60.0-py311"

    derived = _derive_autoscaling_config_from_ray_cr(
        {**cr, "metadata": {**cr["metadata"], "namespace": "default"}}
    )["available_node_types"]
    assert derived["headgroup"]["resources"]["CPU"] == 0
    assert derived["cpu-workers"]["resources"]["CPU"] == 32
    assert "GPU" not in derived["cpu-workers"]["resources"]
    gpu = derived["gpu-workers"]["resources"]
    assert gpu["GPU"] == 1 and gpu["accelerator_type:A10G"] == 1


def test_kuberay_pods_install_pyproject_dependencies_then_start_ray():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    (cr,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cr["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cr["spec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        (start,) = container["args"]
        missing = [d for d in project_deps() if f'"{d}"' not in start]
        assert not missing, f"{container['name']}: pyproject dependencies not installed: {missing}"
        assert start.rstrip().endswith("exec $KUBERAY_GEN_RAY_START_CMD")


def test_runtime_env_uploads_code_only(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(working_dir=str(REPO), **env)  # Ray's own validation of the fields
    assert {".venv/", ".git/", "out/", "models/", "data/"} <= set(env["excludes"])
    assert "pip" not in env and "uv" not in env  # nodes carry the dependencies
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    # what `ray job submit --working-dir .` would upload, from the excludes alone
    caplog.set_level(logging.WARNING)
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    for needed in ("pyproject.toml", "jobs/__main__.py", "clinicalbert_core/runner.py",
                   "configs/demo.yaml"):  # fmt: skip
        assert needed in names
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".git", "out", "models", "data", "tests"}, top
    assert not [n for n in names if n.endswith((".parquet", ".safetensors", ".pyc"))]
    assert package.stat().st_size < 5 << 20


@pytest.mark.parametrize("doc", ["README.md", "cluster/README.md", "cluster/cluster.yaml",
                                 "cluster/kuberay.yaml", "cluster/runtime_env.yaml"])  # fmt: skip
def test_submit_command_runs_the_jobs_entrypoint(doc: str):
    text = (REPO / doc).read_text()
    assert "ray job submit" in text and "--working-dir ." in text
    assert SUBMIT in re.sub(r"\\\n\s*#?\s*", "", text), doc  # command lines joined


def test_cluster_images_agree_on_one_ray_version():
    text = (CLUSTER / "cluster.yaml").read_text() + (CLUSTER / "kuberay.yaml").read_text()
    versions = set(re.findall(r"rayproject/ray:([\d.]+)-py311", text))
    assert versions == {load("kuberay.yaml")["spec"]["rayVersion"]}, versions
