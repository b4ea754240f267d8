"""Offline checks of cluster_configs/ (no network, no Ray cluster, no ray.init).

- Launcher configs (cluster_configs/*.yaml) go through Ray's own ``prepare_config`` and
  ``validate_config`` (ray-schema.json), plus what the schema cannot know: pinned images matching the
  installed Ray, a GPU worker group, the repo installed on every node, S3 access per provider.
- KubeRay and Kubernetes manifests (cluster_configs/kuberay/*.yaml): kinds, apiVersions, names, the
  fields RayJob / RayCronJob / CronJob need, well-formed container resources, runtime envs that Ray's
  RuntimeEnv accepts with pip pins equal to pyproject.toml's, and references between manifests.
- Every ``python jobs/...`` command (RayJob entrypoints, examples in comments and in the README) names
  a file of this repo and only flags that the job's own argument parser defines; complete entrypoints
  also pass the job's own parameter validation.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from decimal import Decimal
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
KUBERAY = CONFIGS / "kuberay"

RAY_VERSION = version("ray")
PY_TAG = "py311"  # the Python the pins are tested with (pyproject.toml)
CPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PY_TAG}"
GPU_IMAGE = f"{CPU_IMAGE}-gpu"
GPU = "nvidia.com/gpu"

LAUNCHER_FILES = sorted(p for p in CONFIGS.glob("*.y*ml"))
MANIFEST_FILES = sorted(p for p in KUBERAY.glob("*.y*ml"))

# What each manifest file must hold (kinds), and the apiVersion of each kind.
EXPECTED_KINDS = {
    "common.yaml": {"ServiceAccount", "PersistentVolumeClaim"},
    "raycluster.yaml": {"RayCluster"},
    "rayjob.yaml": {"RayJob"},
    "rayjob-train.yaml": {"RayJob"},
    "raycronjob.yaml": {"RayCronJob"},
    "cronjob.yaml": {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"},
}
API_VERSIONS = {
    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1",
    "CronJob": "batch/v1", "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "ServiceAccount": "v1", "ConfigMap": "v1", "PersistentVolumeClaim": "v1", "Secret": "v1",
}
# RayCronJob.spec in KubeRay 1.6 (ray.io_raycronjobs.yaml): schedule and jobTemplate required.
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend"}
RUNTIME_ENV_FIELDS = {"working_dir", "pip", "env_vars", "py_modules", "excludes", "config"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------------------------------
# All files
# --------------------------------------------------------------------------------------------------
def test_expected_files_exist():
    names = {p.name for p in LAUNCHER_FILES}
    assert "aws.yaml" in names
    assert names & {"gcp.yaml", "local.yaml"}, "a GCP or on-prem launcher config"
    assert {p.name for p in MANIFEST_FILES} == set(EXPECTED_KINDS), "a new manifest needs its kinds in EXPECTED_KINDS"
    assert (CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_parses_to_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)
    if path.parent == CONFIGS:  # a launcher config: one document with a provider
        assert len(docs) == 1 and "provider" in docs[0]
    else:  # Kubernetes objects only
        assert all("apiVersion" in d and "kind" in d for d in docs)


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# --------------------------------------------------------------------------------------------------
def prepared(path: Path) -> dict:
    """The config as `ray up` sees it before talking to the cloud: defaults merged, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load_docs(path)[0]))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    config = prepared(path)
    assert config["head_node_type"] in config["available_node_types"]


def test_rays_validation_rejects_a_misspelt_field():
    """The validator used above is not a no-op: a typo in a node type fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load_docs(CONFIGS / "aws.yaml")[0]))
    node_type = next(iter(config["available_node_types"].values()))
    node_type["min_worker"] = node_type.pop("min_workers", 0)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def launcher_images(raw: dict) -> dict:
    """{node type: image} as Docker would run them (per-type worker_image over the global one)."""
    docker = raw.get("docker") or {}
    images = {}
    for name, node_type in raw.get("available_node_types", {}).items():
        if name == raw.get("head_node_type"):
            images[name] = docker.get("head_image", docker.get("image"))
        else:
            images[name] = (node_type.get("docker") or {}).get("worker_image", docker.get("worker_image", docker.get("image")))
    if raw["provider"]["type"] == "local":  # one node type, made by Ray: head and workers
        images = {"head": docker.get("head_image", docker.get("image")), "worker": docker.get("worker_image", docker.get("image"))}
    return images


def is_gpu_type(node_type: dict) -> bool:
    return (node_type.get("resources") or {}).get("GPU", 0) > 0 or bool(node_type.get("node_config", {}).get("guestAccelerators"))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_images_pinned_to_installed_ray(path):
    raw = load_docs(path)[0]
    images = launcher_images(raw)
    assert images and all(images.values()), f"every node type runs a Docker image: {images}"
    for name, image in images.items():
        assert image in (CPU_IMAGE, GPU_IMAGE), f"{path.name}: {name} runs {image}, expected {CPU_IMAGE}[-gpu] (installed Ray {RAY_VERSION})"
    head = "head" if raw["provider"]["type"] == "local" else raw["head_node_type"]
    assert images[head] == CPU_IMAGE, "the head runs the CPU image"
    for name, node_type in raw.get("available_node_types", {}).items():
        if is_gpu_type(node_type):
            assert images[name] == GPU_IMAGE, f"GPU node type {name} must run the CUDA image"


@pytest.mark.parametrize("path", [p for p in LAUNCHER_FILES if p.name != "local.yaml"], ids=lambda p: p.name)
def test_launcher_has_autoscaling_gpu_group(path):
    raw = load_docs(path)[0]
    head = raw["available_node_types"][raw["head_node_type"]]
    assert not is_gpu_type(head), "CPU head"
    gpu = {n: t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"] and is_gpu_type(t)}
    assert gpu, "a GPU worker node type"
    for name, node_type in gpu.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name}: state resources GPU so the autoscaler can pick it"
        assert node_type.get("min_workers", 0) == 0, f"{name}: GPU nodes scale from zero"
        assert 1 <= node_type["max_workers"] <= raw["max_workers"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_installs_this_repo_with_gpu_extra_on_every_node(path):
    config = prepared(path)
    remote = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert remote, "file_mounts ships the repo ('.') to the nodes"
    target = remote[0].replace("~", "$HOME")
    install = re.compile(r"pip install .*" + re.escape(f"{target}[gpu]"))
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(c) for c in config[role]), f"{role} installs {target}[gpu]"
    for name, node_type in config["available_node_types"].items():  # a per-type list replaces the global one
        if "worker_setup_commands" in node_type:
            assert any(install.search(c) for c in node_type["worker_setup_commands"]), name
    assert ".gitignore" in config.get("rsync_filter", []), "keep .venv and outputs off the nodes"


def test_aws_nodes_reach_s3_through_instance_profiles():
    raw = load_docs(CONFIGS / "aws.yaml")[0]
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Arn", "").startswith("arn:aws:iam::") or profile.get("Name"), f"{name}: IamInstanceProfile"
        assert ":instance-profile/" in profile.get("Arn", ":instance-profile/"), f"{name}: an instance profile ARN, not a role ARN"


@pytest.mark.skipif(not (CONFIGS / "gcp.yaml").exists(), reason="no gcp.yaml")
def test_gcp_gpu_nodes_are_schedulable():
    raw = load_docs(CONFIGS / "gcp.yaml")[0]
    for name, node_type in raw["available_node_types"].items():
        cfg = node_type["node_config"]
        if cfg.get("guestAccelerators"):
            assert node_type["resources"]["GPU"] == sum(a["acceleratorCount"] for a in cfg["guestAccelerators"]), name
            # GCE refuses GPU VMs that would live-migrate.
            assert any(s.get("onHostMaintenance") == "TERMINATE" for s in cfg.get("scheduling", [])), name
        if name != raw["head_node_type"]:
            assert cfg.get("serviceAccounts"), f"{name}: workers need their own identity"


@pytest.mark.skipif(not (CONFIGS / "local.yaml").exists(), reason="no local.yaml")
def test_local_provider_lists_hosts():
    raw = load_docs(CONFIGS / "local.yaml")[0]
    provider = raw["provider"]
    workers = provider["worker_ips"]
    assert provider["head_ip"] and workers and len(set(workers)) == len(workers)
    assert provider["head_ip"] not in workers
    assert raw.get("min_workers", len(workers)) <= len(workers) and raw.get("max_workers", len(workers)) <= len(workers)


# --------------------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def manifests() -> dict:
    """{file name: documents}, parsed once (the tests only read them)."""
    return {p.name: load_docs(p) for p in MANIFEST_FILES}


def all_objects() -> list:
    return [d for docs in manifests().values() for d in docs]


@lru_cache(maxsize=None)
def embedded_rayjob() -> dict:
    cm = next(d for d in manifests()["cronjob.yaml"] if d["kind"] == "ConfigMap")
    (text,) = cm["data"].values()
    return yaml.safe_load(text)


def rayjob_specs() -> dict:
    """Every RayJob spec: the RayJobs, the RayCronJob's template and the CronJob's ConfigMap."""
    m = manifests()
    out = {}
    for name in ("rayjob.yaml", "rayjob-train.yaml"):
        for d in m[name]:
            if d["kind"] == "RayJob":
                out[f"{name}:{d['metadata']['name']}"] = d["spec"]
    for d in m["raycronjob.yaml"]:
        out[f"raycronjob.yaml:{d['metadata']['name']}"] = d["spec"]["jobTemplate"]
    out["cronjob.yaml:ConfigMap"] = embedded_rayjob()["spec"]
    return out


def cluster_specs() -> dict:
    out = {f"{k}:rayClusterSpec": v["rayClusterSpec"] for k, v in rayjob_specs().items()}
    for d in manifests()["raycluster.yaml"]:
        out[f"raycluster.yaml:{d['metadata']['name']}"] = d["spec"]
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_manifest_kinds_api_versions_and_names(name):
    docs = manifests()[name]
    assert {d["kind"] for d in docs} == EXPECTED_KINDS[name]
    for d in docs:
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], f"{d['kind']} {d['apiVersion']}"
        meta = d.get("metadata") or {}
        assert "namespace" not in meta, "namespace comes from kubectl -n"
        assert isinstance(meta.get("name"), str) and DNS_1123.match(meta["name"]) and len(meta["name"]) <= 63, meta


def test_embedded_rayjob_is_a_rayjob_with_generated_names():
    job = embedded_rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "name" not in job["metadata"] and DNS_1123.match(job["metadata"]["generateName"].rstrip("-"))


def quantity(value) -> Decimal:
    text = str(value)
    assert QUANTITY.match(text), f"not a Kubernetes quantity: {value!r}"
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
                "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * Decimal(suffixes[suffix])
    return Decimal(text)


def check_resources(where: str, container: dict) -> None:
    res = container.get("resources") or {}
    assert set(res) <= {"requests", "limits", "claims"}, f"{where}: {set(res)}"
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    for kind, values in (("limits", limits), ("requests", requests)):
        for key, value in values.items():
            assert quantity(value) >= 0, f"{where}: {kind}.{key}"
    for key in set(limits) & set(requests):
        assert quantity(requests[key]) <= quantity(limits[key]), f"{where}: requests.{key} > limits.{key}"
    if GPU in limits or GPU in requests:
        # Extended resources: whole numbers, set in limits, requests (if any) equal to limits.
        assert GPU in limits, f"{where}: {GPU} belongs in limits"
        count = quantity(limits[GPU])
        assert count >= 1 and count == count.to_integral_value(), f"{where}: {GPU} must be a whole number of GPUs"
        assert quantity(requests.get(GPU, limits[GPU])) == count, f"{where}: {GPU} requests must equal limits"


def ray_pods(spec: dict) -> list:
    """(group name, pod spec, container[0]) of the head and every worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return [(name, pod, pod["containers"][0]) for name, pod in out]


def gpu_groups(spec: dict) -> list:
    return [g for g in spec.get("workerGroupSpecs", []) if GPU in (g["template"]["spec"]["containers"][0].get("resources", {}).get("limits") or {})]


@pytest.mark.parametrize("label", sorted(cluster_specs()))
def test_ray_cluster_spec(label):
    spec = cluster_specs()[label]
    assert spec["rayVersion"] == RAY_VERSION, f"rayVersion {spec['rayVersion']} vs installed Ray {RAY_VERSION}"
    assert "headGroupSpec" in spec and spec.get("workerGroupSpecs"), "head and worker groups"
    for params in [spec["headGroupSpec"].get("rayStartParams") or {}] + [g.get("rayStartParams") or {} for g in spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values are strings: {params}"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and all(DNS_1123.match(n) for n in names)
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    assert gpu_groups(spec), "a worker group with an nvidia.com/gpu limit"
    for group, pod, container in ray_pods(spec):
        where = f"{label}/{group}"
        check_resources(where, container)
        limits = container["resources"].get("limits") or {}
        assert "cpu" in limits and "memory" in limits, f"{where}: Ray sizes itself from the cpu and memory limits"
        want = GPU_IMAGE if GPU in limits else CPU_IMAGE
        assert container["image"] == want, f"{where}: {container['image']}, expected {want}"
        assert group != "head" or GPU not in limits, "CPU head"
    if any(g["minReplicas"] < g["maxReplicas"] for g in spec["workerGroupSpecs"]):
        assert spec.get("enableInTreeAutoscaling") is True, f"{label}: min < max replicas needs the autoscaler"


def test_resource_check_rejects_bad_values():
    with pytest.raises(AssertionError):
        check_resources("x", {"resources": {"limits": {"cpu": "4", "memory": "24 GB"}}})
    with pytest.raises(AssertionError):
        check_resources("x", {"resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}})
    with pytest.raises(AssertionError):
        check_resources("x", {"resources": {"limits": {GPU: "0.5"}}})
    check_resources("x", {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "2Gi", GPU: 1}}})


def head_mounts(spec: dict) -> dict:
    container = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("label", sorted(rayjob_specs()))
def test_rayjob_spec(label):
    spec = rayjob_specs()[label]
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()
    assert spec.get("shutdownAfterJobFinishes") is True, "delete the cluster when the job ends"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec.get("activeDeadlineSeconds"), int) and spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    assert "headGroupSpec" in cluster
    # The jobs size themselves on the nodes up when they start: a per-run cluster starts its GPUs.
    for g in gpu_groups(cluster):
        assert g["minReplicas"] >= 1, f"{label}: GPU group {g['groupName']} must start with the cluster"
    # Model paths are local to the driver (head): they must be on a volume mounted there.
    argv = shlex.split(spec["entrypoint"])
    mounts = head_mounts(spec)
    for flag in ("--model", "--output"):
        if flag in argv and not argv[argv.index(flag) + 1].startswith("s3://"):
            path = argv[argv.index(flag) + 1]
            mount = next((m for p, m in mounts.items() if path == p or path.startswith(p + "/")), None)
            assert mount is not None, f"{label}: {flag} {path} is not on a volume of the head"
            if flag == "--output":
                assert not mount.get("readOnly"), f"{label}: {flag} {path} on a read-only mount"


def pyproject_pins() -> dict:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    return {canonicalize_name(r.name): r.specifier for r in reqs}


@pytest.mark.parametrize("label", sorted(rayjob_specs()))
def test_rayjob_runtime_env(label):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob_specs()[label]["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= RUNTIME_ENV_FIELDS, f"unknown runtime env fields: {set(env) - RUNTIME_ENV_FIELDS}"
    RuntimeEnv(**env)  # Ray's own validation (types, working_dir URI form, pip format)
    # The submitter pod has no checkout: the code must come from a remote archive.
    assert re.match(r"^(s3|gs|https)://.+\.zip$", env["working_dir"]), env["working_dir"]
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    listed = {canonicalize_name(Requirement(p).name): Requirement(p).specifier for p in packages}
    pins = pyproject_pins()
    assert "ray" not in listed, "Ray comes with the image (pinned by tag), not from pip"
    for name, spec in listed.items():
        assert name in pins, f"{name} is not a dependency in pyproject.toml"
        assert spec == pins[name], f"{name}{spec} differs from pyproject.toml's {name}{pins[name]}"
    missing = set(pins) - set(listed) - {"ray"}
    assert not missing, f"pyproject.toml dependencies missing from the runtime env: {sorted(missing)}"


CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = ({}, {}, {},
              {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
              {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())})
CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def valid_cron(expr: str) -> bool:
    """A 5-field cron expression as Kubernetes (robfig/cron standard parser) accepts it."""
    if expr.strip() in CRON_MACROS:
        return True
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (low, high), names in zip(fields, CRON_FIELDS, CRON_NAMES):
        for item in field.split(","):
            m = re.fullmatch(r"(\*|\?|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/([0-9]+))?", item)
            if not m or (m.group(2) is not None and int(m.group(2)) < 1):
                return False
            if m.group(1) in ("*", "?"):
                continue
            for part in m.group(1).split("-"):
                value = names.get(part.upper()) if not part.isdigit() else int(part)
                if value is None or not low <= value <= high:
                    return False
    return True


def test_cron_validator():
    for good in ("0 2 * * *", "*/15 * * * *", "0 3 * * MON-FRI", "30 1 1,15 * *", "@daily"):
        assert valid_cron(good), good
    for bad in ("0 2 * *", "60 2 * * *", "0 24 * * *", "0 2 * * * *", "*/0 * * * *", "0 2 * * FUNDAY"):
        assert not valid_cron(bad), bad


def test_raycronjob():
    (job,) = manifests()["raycronjob.yaml"]
    spec = job["spec"]
    assert set(spec) <= RAYCRONJOB_SPEC_FIELDS, f"not in the RayCronJob 1.6 schema: {set(spec) - RAYCRONJOB_SPEC_FIELDS}"
    assert valid_cron(spec["schedule"]), spec["schedule"]
    assert isinstance(spec.get("suspend", False), bool)
    assert "entrypoint" in spec["jobTemplate"] and "spec" not in spec["jobTemplate"], "jobTemplate is a RayJob spec"


def test_cronjob_submits_the_configmap_rayjob():
    docs = {d["kind"]: d for d in manifests()["cronjob.yaml"]}
    cron, role, binding, sa, cm = (docs[k] for k in ("CronJob", "Role", "RoleBinding", "ServiceAccount", "ConfigMap"))
    spec = cron["spec"]
    assert valid_cron(spec["schedule"]), spec["schedule"]
    assert spec.get("concurrencyPolicy") == "Forbid", "one clustering run at a time"
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    # The Role lets it create and follow RayJobs, and the binding gives that Role to this account.
    verbs = {v for rule in role["rules"] if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] for v in rule["verbs"]}
    assert {"create", "get"} <= verbs, verbs
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    # The pod mounts the ConfigMap and its script reads the RayJob file from there.
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    (key,) = cm["data"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert f"{mount['mountPath'].rstrip('/')}/{key}" in script and "kubectl create" in script
    check_resources("cronjob.yaml/submit", container)
    # The pod outlives the RayJob's own deadline, so KubeRay's deadline is the one that fires.
    assert job["activeDeadlineSeconds"] > embedded_rayjob()["spec"]["activeDeadlineSeconds"]


def walk(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def test_references_between_manifests_resolve():
    objects = all_objects() + [embedded_rayjob()]
    defined = {(d["kind"], d["metadata"].get("name")) for d in all_objects()}
    for name in walk(objects, "serviceAccountName"):
        assert ("ServiceAccount", name) in defined, f"service account {name} is not defined under {KUBERAY}"
    for claim in walk(objects, "persistentVolumeClaim"):
        assert ("PersistentVolumeClaim", claim["claimName"]) in defined, claim
    for ref in walk(objects, "secretRef"):
        assert ref.get("optional") is True or ("Secret", ref["name"]) in defined, ref


@pytest.mark.parametrize("label", sorted(cluster_specs()))
def test_ray_pods_can_reach_s3(label):
    accounts = {d["metadata"]["name"]: d for d in all_objects() if d["kind"] == "ServiceAccount"}
    for group, pod, container in ray_pods(cluster_specs()[label]):
        # EKS: IRSA on the pod's service account; elsewhere: keys from the (optional) Secret.
        account = accounts.get(pod.get("serviceAccountName"), {})
        role = (account.get("metadata", {}).get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
        assert re.fullmatch(r"arn:aws:iam::[0-9]{12}:role/[\w+=,.@/-]+", role), f"{label}/{group}: IRSA role ARN {role!r}"
        secrets = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets, f"{label}/{group}: no envFrom Secret for clusters without IRSA"


# --------------------------------------------------------------------------------------------------
# Job commands: repo paths and flags
# --------------------------------------------------------------------------------------------------
def job_module(script: str):
    return load_script(script)


def check_command(argv: list[str], *, complete: bool) -> None:
    """``python jobs/X.py FLAGS``: the file exists and the job's parser knows every flag exactly (no
    argparse prefix matching); ``complete`` commands must also parse and pass the job's own checks."""
    assert len(argv) >= 2 and Path(argv[0]).name in ("python", "python3"), argv
    script, args = argv[1], argv[2:]
    assert (ROOT / script).is_file(), f"{script} is not a file of this repository"
    parser = job_module(script).build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    for token in args:
        if token.startswith("-") and not re.fullmatch(r"-?[0-9.]+", token):
            assert token.split("=", 1)[0] in known, f"{script}: unknown flag {token}"
    if not complete:
        return
    try:
        parsed = parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{script} rejects {shlex.join(args)} (exit {e.code})")
    module = job_module(script)
    if hasattr(module, "job_config"):  # jobs/cluster.py: flags -> JobConfig, then its parameter checks
        from agc_ray.distributed.job import validate_config

        validate_config(module.job_config(parsed))
    if hasattr(module, "parse_config"):  # jobs/train.py: flags -> TrainJobConfig.validate()
        module.parse_config(args)[0].validate()


def commands_in_text(text: str) -> list[tuple[str, list[str]]]:
    """``python jobs/...`` commands in comments and code blocks, with backslash continuations joined.
    An example elided with '...' has its flags checked up to there."""
    lines = [re.sub(r"^\s*#\s?", "", line).strip() for line in text.splitlines()]
    out = []
    start = re.compile(r"python3? jobs/\S+\.py")
    for i, line in enumerate(lines):
        if not start.search(line):
            continue
        command = line
        j = i
        while command.endswith("\\") and j + 1 < len(lines):
            j += 1
            command = command[:-1] + " " + lines[j]
        command = command[start.search(command).start():].split("`")[0]
        out.append((command, shlex.split(command.split("...")[0])))
    return out


def example_commands() -> list:
    found = []
    for path in sorted(CONFIGS.rglob("*")):
        if path.suffix in (".yaml", ".yml", ".md"):
            for command, argv in commands_in_text(path.read_text()):
                found.append(pytest.param(command, argv, id=f"{path.relative_to(CONFIGS)}:{command[:60]}"))
    return found


@pytest.mark.parametrize("label", sorted(rayjob_specs()))
def test_entrypoint_runs_a_repo_job_with_known_flags(label):
    argv = shlex.split(rayjob_specs()[label]["entrypoint"].replace("@RUN_DATE@", "2026-01-01"))
    check_command(argv, complete=True)


@pytest.mark.parametrize("command,argv", example_commands())
def test_documented_commands_use_repo_jobs_and_known_flags(command, argv):
    check_command(argv, complete=False)


def test_documented_commands_are_found():
    commands = [c for c, _ in commands_in_text((CONFIGS / "README.md").read_text())]
    assert any("jobs/cluster.py" in c for c in commands) and any("jobs/train.py" in c for c in commands)


def test_command_check_rejects_misspelt_and_abbreviated_flags():
    from agc_ray.distributed.errors import InputError

    good = "python jobs/cluster.py --input s3://b/in/ --output s3://b/out --model /models/m --num-shards 8"
    check_command(shlex.split(good), complete=True)
    for bad in (good.replace("--num-shards", "--num-shard"),      # an argparse prefix: parses, still wrong
                good.replace("--model", "--modle"),
                good.replace("jobs/cluster.py", "jobs/clusters.py"),
                good + " --unsupervised"):                         # parses; the job's own check refuses it
        with pytest.raises((AssertionError, InputError)):
            check_command(shlex.split(bad), complete=True)
