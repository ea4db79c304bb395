"""Cluster definitions: every `ray up` YAML passes Ray's own config preparation and validation, and the
KubeRay manifests carry what KubeRay needs and point at files and entrypoints that exist."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from neuraflex_ray.config import load_config
from neuraflex_ray.train.driver import scaling_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((REPO / "clusters").glob("*.yaml"))
KUBERAY = REPO / "clusters" / "kuberay"
IMAGE_ROOT = "/home/ray/neuraflex-ray"  # where clusters/Dockerfile puts the project


def test_there_is_an_onprem_an_aws_and_a_gcp_cluster():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CLUSTER_YAMLS}
    assert {"local", "aws", "gcp"} <= providers


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_own_validation(path):
    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)  # what `ray up` does before validating: defaults, node types
    validate_config(config)  # Ray's JSON schema + its cross-field checks
    assert raw["idle_timeout_minutes"] > 0 and raw["max_workers"] >= 1
    # The project reaches every node and its pinned requirements are installed there.
    assert any((REPO / src).resolve() == REPO for src in raw["file_mounts"].values()), path
    assert any("requirements.txt" in cmd for cmd in raw["setup_commands"]), path
    if raw["provider"]["type"] == "local":
        assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
        return
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert 8 in gpus.values() and 1 in gpus.values(), gpus  # an 8-GPU type and a single-GPU type
    for name, t in types.items():
        if gpus[name]:
            assert t["min_workers"] == 0 < t["max_workers"], name  # GPU nodes scale from zero
    assert raw["docker"]["image"].startswith("rayproject/ray:2.60.0")


def test_gpu_job_configs_place_workers_on_the_gpu_node_types():
    node_types = [t for p in CLUSTER_YAMLS if yaml.safe_load(p.read_text())["provider"]["type"] != "local"
                  for t in yaml.safe_load(p.read_text())["available_node_types"].values()]
    for name in ("moe_small_gpu", "moe_1b_gpu", "neurofm_base_gpu"):
        t = load_config(REPO / "jobs" / "configs" / f"{name}.yaml").train
        sc = scaling_config(t)
        assert sc.use_gpu and sc.resources_per_worker["GPU"] == 1, name
        # Some node type of the cloud clusters holds every worker of the job on one node (PACK),
        # or at least one worker per node: its CPUs, GPUs and accelerator type cover the request.
        need = {k: v * (t.num_workers if t.placement_strategy == "STRICT_PACK" else 1)
                for k, v in sc.resources_per_worker.items()}
        if sc.accelerator_type:
            need[f"accelerator_type:{sc.accelerator_type}"] = 0.001
        assert any(all(nt["resources"].get(k, 0) >= v for k, v in need.items()) for nt in node_types), (name, need)
    # The debug flavour is the same job on CPUs: no GPU, by config alone.
    assert not scaling_config(load_config(REPO / "jobs" / "configs" / "moe_debug.yaml").train).use_gpu


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    out = {}
    for p in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            out[doc["kind"]] = doc
    return out


def check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay's RayCluster spec requires, and images built from this repository."""
    assert spec["rayVersion"] == "2.60.0", where
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert spec["workerGroupSpecs"], where
    for g in groups:
        assert "rayStartParams" in g, where
        (container, *_) = g["template"]["spec"]["containers"]
        assert container["image"].startswith("neuraflex-ray:") and container["workingDir"] == IMAGE_ROOT, where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/mnt/cluster_storage" in mounts, where  # the shared storage the GPU job configs write to
    for w in spec["workerGroupSpecs"]:
        assert w["groupName"] and 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"], where


def repo_path(path_in_image: str) -> Path:
    assert path_in_image.startswith(IMAGE_ROOT + "/"), path_in_image
    return REPO / path_in_image[len(IMAGE_ROOT) + 1:]


def test_kuberay_raycluster_autoscales_gpu_groups():
    rc = manifests()["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    check_cluster_spec(rc["spec"], "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    gpus = [int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for w in rc["spec"]["workerGroupSpecs"]]
    assert sorted(gpus) == [1, 8]


def test_kuberay_rayjob_runs_the_moe_training_entrypoint():
    job = manifests()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]) == REPO / "jobs" / "train_moe.py"
    config = repo_path(argv[argv.index("--config") + 1])
    assert config.is_file()
    train = load_config(config).train
    assert train.use_gpu and job["spec"]["shutdownAfterJobFinishes"] is True
    gpus = sum(int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for w in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= train.num_workers  # the ephemeral cluster holds every training worker


def test_kuberay_rayservice_serves_the_lm_app():
    svc = manifests()["RayService"]
    assert svc["apiVersion"] == "ray.io/v1"
    check_cluster_spec(svc["spec"]["rayClusterConfig"], "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "neuraflex_ray.serving.app:build_app"
    module, attr = app.import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    assert app.deployments[0].ray_actor_options.num_gpus == 1
    assert svc["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]  # a lost head comes back
    pvc = manifests()["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_dockerfile_and_local_script_exist_and_name_real_files():
    dockerfile = (REPO / "clusters" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in dockerfile and f"WORKDIR {IMAGE_ROOT}" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert (REPO / "clusters" / "local.sh").stat().st_mode & 0o111  # executable


# ---------------------------------------------------------------------------------------------
# Access: Ray's job API runs arbitrary code for whoever reaches it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_ray_up_cluster_starts_ray_with_token_auth_and_a_loopback_dashboard(path):
    raw = yaml.safe_load(path.read_text())
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2, path
    for cmd in starts:  # the mode is set in the same shell, before `ray start`
        assert cmd.index("export RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
        host = next((a.split("=", 1)[1] for a in shlex.split(cmd.split("ray start", 1)[1]) if a.startswith("--dashboard-host")),
                    "127.0.0.1")  # Ray's default
        assert host in ("127.0.0.1", "localhost"), cmd
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", path  # every node holds the token


def test_every_kuberay_cluster_enables_token_auth():
    specs = {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
             "RayService": lambda d: d["spec"]["rayClusterConfig"]}
    found = manifests()
    for kind, spec in specs.items():
        s = spec(found[kind])
        assert s.get("authOptions", {}).get("mode") == "token", kind
        # The dashboard may listen on the pod's interfaces only because the token guards it.
        assert s["headGroupSpec"]["rayStartParams"].get("dashboard-host") in ("0.0.0.0", None), kind


def test_the_local_cluster_script_uses_token_auth_on_loopback():
    script = (REPO / "clusters" / "local.sh").read_text()
    assert "RAY_AUTH_MODE=token" in script and "--dashboard-host=127.0.0.1" in script
    assert "0.0.0.0" not in script


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_ray_up_head_keeps_its_gcs_in_redis_when_the_env_file_says_so(path, tmp_path):
    """The head's start command, run by bash up to `ray start` (which only echoes what it would get): with
    clusters/gcs_redis.env on the head, Ray sees the Redis address, namespace and password; without it,
    nothing (an empty RAY_REDIS_ADDRESS would count as set)."""
    import subprocess

    head = next(c for c in yaml.safe_load(path.read_text())["head_start_ray_commands"] if "ray start" in c)
    before, args = head.split("ray start", 1)
    probe = before + 'echo "addr=${RAY_REDIS_ADDRESS-unset} ns=${RAY_external_storage_namespace-unset}"' + args
    example = (REPO / "clusters" / "gcs_redis.env.example").read_text()
    env_file = tmp_path / "neuraflex-ray" / "clusters" / "gcs_redis.env"

    def run() -> str:
        return subprocess.run(["bash", "-c", probe], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, check=True).stdout

    words = run().split()
    assert words[:2] == ["addr=unset", "ns=unset"] and not any("redis" in w for w in words)
    env_file.parent.mkdir(parents=True)
    env_file.write_text(example.replace("# export NFR_REDIS_PASSWORD=...", "export NFR_REDIS_PASSWORD=s3cret"))
    words = run().split()
    assert words[:2] == ["addr=redis.internal.example:6379", "ns=neuraflex"] and "--redis-password=s3cret" in words
    assert "clusters/gcs_redis.env" in (REPO / ".gitignore").read_text().split()  # a password is never committed
