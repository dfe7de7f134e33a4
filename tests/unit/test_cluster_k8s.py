"""The cluster's Serve config and Kubernetes manifests, validated offline (no cluster, no apiserver)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from fmplex.cluster.config import ClusterSpec, load_spec, serve_config, set_replicas
from fmplex.cluster.kube import DeviceGroup, render, to_yaml, validate
from fmplex.registry import RegistryError

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "model_repository"
FMPLEX = str(Path(sys.executable).parent / "fmplex")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(EMBEDDED, dst)
    return dst


def test_serve_config_is_a_valid_serve_deploy_schema_with_one_deployment_per_backbone() -> None:
    cfg = serve_config("/shared/repo", ClusterSpec(replicas={"minilm": 3}), http_port=8123, grpc_port=9123)
    parsed = ServeDeploySchema.parse_obj(cfg)
    (app,) = parsed.applications
    deps = {d.name: d for d in app.deployments}
    assert deps["fm-minilm"].num_replicas == 3 and deps["fm-minilm"].max_replicas_per_node == 1
    assert deps["Placer"].num_replicas == 1 and deps["Ingress"].num_replicas == 1
    assert app.args["repository"] == "/shared/repo" and app.args["backbones"] == ["minilm"]
    assert parsed.http_options.host == "127.0.0.1" and parsed.http_options.port == 8123
    assert parsed.grpc_options.port == 9123


def test_a_bad_serve_config_is_rejected_by_the_schema() -> None:
    cfg = serve_config("/r", ClusterSpec(replicas={"minilm": 2}))
    cfg["applications"][0]["deployments"][2]["num_replicas"] = "many"
    with pytest.raises(Exception, match="num_replicas"):
        ServeDeploySchema.parse_obj(cfg)


def test_cluster_spec_is_recorded_beside_the_registry(repo: Path) -> None:
    set_replicas(repo, "minilm", 2)
    assert load_spec(repo).replicas == {"minilm": 2}
    set_replicas(repo, "minilm", 3)
    assert json.loads((repo / "fmplex.cluster.json").read_text())["replicas"] == {"minilm": 3}
    set_replicas(repo, "minilm", 0)
    assert load_spec(repo).replicas == {}
    with pytest.raises(RegistryError, match="no host for backbone 'vit'.*it has: minilm"):
        set_replicas(repo, "vit", 1)


def test_rendered_manifests_validate_offline(repo: Path) -> None:
    spec = ClusterSpec(replicas={"minilm": 4})
    manifests = render(repo, spec, groups=(DeviceGroup("cpu", pods=2), DeviceGroup("gpu", pods=1, gpus=1)), device_of={"minilm": "gpu"})
    checked = validate(manifests)
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["PersistentVolumeClaim", "RayService", "Service", "Service", "Service", "ServiceMonitor"]
    assert any("serveConfigV2" in c for c in checked) and sum("PodTemplate" in c for c in checked) == 3
    rs = next(m for m in manifests if m["kind"] == "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu", "gpu"]
    gpu = groups[1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    dep = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "fm-minilm")
    assert dep["num_replicas"] == 4 and dep["ray_actor_options"]["resources"] == {"fmplex_gpu": 0.001}
    assert serve_cfg["applications"][0]["args"]["repository"] == "/repository"
    pvc = next(m for m in manifests if m["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # the multi-document YAML reads back to the same objects
    assert list(yaml.safe_load_all(to_yaml(manifests))) == manifests


def test_validation_rejects_broken_manifests(repo: Path) -> None:
    good = render(repo, ClusterSpec(replicas={"minilm": 2}))
    bad = copy.deepcopy(good)
    svc = next(m for m in bad if m["kind"] == "Service")
    svc["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(good)
    rs = next(m for m in bad if m["kind"] == "RayService")
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(good)
    rs = next(m for m in bad if m["kind"] == "RayService")
    rs["spec"]["serveConfigV2"] = yaml.safe_dump({"applications": [{"name": "x", "import_path": "a:b", "deployments": [{"name": "d", "num_replicas": -3}]}]})
    with pytest.raises(Exception, match="num_replicas"):
        validate(bad)


def test_render_refuses_unknown_backbones_and_device_groups(repo: Path) -> None:
    with pytest.raises(RegistryError, match="vit"):
        render(repo, ClusterSpec(replicas={"vit": 1}))
    with pytest.raises(ValueError, match="tpu"):
        render(repo, ClusterSpec(replicas={"minilm": 1}), device_of={"minilm": "tpu"})


def test_the_cli_renders_what_the_repository_records(repo: Path, tmp_path: Path) -> None:
    rec = subprocess.run([FMPLEX, "cluster", "deploy", "minilm", "-n", "2", "--offline", "--repo", str(repo)], capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0, rec.stderr
    assert load_spec(repo).replicas == {"minilm": 2}
    out = tmp_path / "fmplex.yaml"
    run = subprocess.run([FMPLEX, "cluster", "k8s", "--repo", str(repo), "--out", str(out), "--group", "cpu=3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    validate(docs)
    rs = next(d for d in docs if d["kind"] == "RayService")
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
    bad = subprocess.run([FMPLEX, "cluster", "k8s", "--repo", str(repo), "--group", "cpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "NAME=PODS" in bad.stderr


def test_the_committed_example_matches_the_renderer() -> None:
    """deploy/k8s/fmplex.yaml is what the renderer writes for the embedded repository at 2 replicas."""
    committed = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "fmplex.yaml").read_text()))
    validate(committed)
    assert committed == render(EMBEDDED, ClusterSpec(replicas={"minilm": 2}))
