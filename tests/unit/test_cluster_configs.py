"""The cluster configs under cluster/: Ray cluster launcher (AWS, GCP) and KubeRay (RayCluster, RayJob).

Nothing here brings a cluster up. The launcher configs are validated against the JSON schema Ray itself ships
(ray/autoscaler/ray-schema.json) and go through Ray's own `prepare_config` + `validate_config`, as `ray up`
does; the KubeRay manifests are checked for the fields the ray.io/v1 CRDs require and are parsed by Ray's KubeRay
autoscaler code into an autoscaling config. Then, for every node-group layout: the node types are
cluster/node_types.yaml's (defined once; the tests' local autoscaling cluster is generated from the same file), the
custom resources the groups declare cover (names, and capacity) what every job in jobs/ asks for, the dashboard is not
exposed beyond the cluster, and Ray token auth stays on. Each check is a function returning a list of problems, so the negative
tests can show it catches a broken config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from support.autoscaling import FAKE_HEAD_TYPE, HEAD, fake_provider_config, node_types

from pear_ray.config import load_job

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYCLUSTER_FILE = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_FILE = CLUSTER / "kuberay" / "rayjob.yaml"
ALL_FILES = [*LAUNCHER_FILES.values(), RAYCLUSTER_FILE, RAYJOB_FILE]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
STANDARD_RESOURCES = {"CPU", "GPU", "TPU", "memory", "object_store_memory"}
ROLES = ("rollout", "learner", "reference")

# Fields the ray.io/v1 CRDs require (or that a pear_ray cluster cannot work without). `*` walks every item of a list.
RAYCLUSTER_REQUIRED = [
    "apiVersion",
    "kind",
    "metadata.name",
    "spec.headGroupSpec.rayStartParams",
    "spec.headGroupSpec.template.spec.containers",
    "spec.headGroupSpec.template.spec.containers.*.name",
    "spec.headGroupSpec.template.spec.containers.*.image",
    "spec.headGroupSpec.template.spec.containers.*.resources",
    "spec.workerGroupSpecs",
    "spec.workerGroupSpecs.*.groupName",
    "spec.workerGroupSpecs.*.replicas",
    "spec.workerGroupSpecs.*.minReplicas",
    "spec.workerGroupSpecs.*.maxReplicas",
    "spec.workerGroupSpecs.*.rayStartParams",
    "spec.workerGroupSpecs.*.template.spec.containers",
    "spec.workerGroupSpecs.*.template.spec.containers.*.name",
    "spec.workerGroupSpecs.*.template.spec.containers.*.image",
    "spec.workerGroupSpecs.*.template.spec.containers.*.resources",
]
RAYJOB_REQUIRED = ["apiVersion", "kind", "metadata.name", "spec.entrypoint"]


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def missing_paths(doc: Any, paths: list[str]) -> list[str]:
    """The dotted paths absent from doc (empty values count as absent, except {} for rayStartParams)."""
    missing = []

    def walk(node: Any, parts: list[str], seen: str) -> None:
        if not parts:
            return
        head, *rest = parts
        if head == "*":
            if not isinstance(node, list) or not node:
                missing.append(seen)
                return
            for i, item in enumerate(node):
                walk(item, rest, f"{seen}[{i}]")
            return
        here = f"{seen}.{head}" if seen else head
        if not isinstance(node, dict) or head not in node or node[head] is None or node[head] == "" or node[head] == []:
            missing.append(here)
            return
        walk(node[head], rest, here)

    for path in paths:
        walk(doc, path.split("."), "")
    return missing


def kuberay_custom_resources(ray_start_params: dict[str, Any]) -> dict[str, int]:
    """`rayStartParams.resources` in the quoted-JSON form KubeRay passes to `ray start --resources`:
    '"{\\"name\\": amount}"'. Strict: a form Ray's KubeRay autoscaler would misread is an error here."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    if not (isinstance(raw, str) and len(raw) >= 2 and raw[0] == raw[-1] == '"'):
        raise ValueError(f"rayStartParams.resources must be a quoted JSON string like '\"{{\\\"learner\\\": 8}}\"', got {raw!r}")
    parsed = json.loads(raw[1:-1].replace("\\", ""))
    if not isinstance(parsed, dict) or not all(isinstance(v, int) and v >= 0 for v in parsed.values()):
        raise ValueError(f"rayStartParams.resources must map names to non-negative integers, got {parsed!r}")
    return parsed


def launcher_groups(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node type -> {custom, gpu (None when the provider infers it), min, max, head}."""
    groups = {}
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        groups[name] = {
            "custom": {k: v for k, v in resources.items() if k not in STANDARD_RESOURCES},
            "gpu": resources.get("GPU"),
            "min": node_type.get("min_workers", 0),
            "max": node_type.get("max_workers", 0),
            "head": name == config["head_node_type"],
        }
    return groups


def _gpu_limit(group_spec: dict[str, Any]) -> int:
    limits = group_spec["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def kuberay_groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = spec["headGroupSpec"]
    groups = {"head": {"custom": kuberay_custom_resources(head.get("rayStartParams", {})), "gpu": _gpu_limit(head),
                       "min": 1, "max": 1, "head": True}}
    for group in spec["workerGroupSpecs"]:
        groups[group["groupName"]] = {
            "custom": kuberay_custom_resources(group.get("rayStartParams", {})),
            "gpu": _gpu_limit(group),
            "min": group["minReplicas"],
            "max": group["maxReplicas"],
            "head": False,
        }
    return groups


def job_demands() -> dict[str, dict[str, Any]]:
    """Per job file: each role's per-actor {custom resources, num_gpus} and the custom-resource total it asks for."""
    demands = {}
    for path in JOB_FILES:
        job = load_job(path)
        res = job.resources
        rollout_actors = res.rollout.max_actors or res.rollout.num_actors  # an elastic pool at its largest
        count = {"rollout": rollout_actors, "learner": res.learner.num_ranks, "reference": 1}
        total: dict[str, float] = {}
        actors = {}
        for role in ROLES:
            actor = getattr(res, role)
            actors[role] = {"custom": dict(actor.resources), "gpus": actor.num_gpus}
            for name, amount in actor.resources.items():
                total[name] = total.get(name, 0) + amount * count[role]
        demands[path.name] = {"actors": actors, "total": total}
    return demands


def coverage_problems(groups: dict[str, dict[str, Any]], demands: dict[str, dict[str, Any]]) -> list[str]:
    """Every custom resource a job asks for is declared by some worker group, one actor of each role fits one
    node of some group (custom amount, and GPUs where the group states them), and the groups at max size hold
    the job's total."""
    problems = []
    for job_name, demand in demands.items():
        for role, actor in demand["actors"].items():
            if not actor["custom"]:
                continue
            fits = [
                name for name, g in groups.items()
                if all(g["custom"].get(r, 0) >= amount for r, amount in actor["custom"].items())
                and (g["gpu"] is None or g["gpu"] >= actor["gpus"])
            ]
            if not fits:
                problems.append(f"{job_name}: no node group fits one {role} actor {actor}")
        for name, amount in demand["total"].items():
            capacity = sum(g["custom"].get(name, 0) * (1 if g["head"] else g["max"]) for g in groups.values())
            if capacity < amount:
                problems.append(f"{job_name}: asks for {amount} {name!r} in all; the groups hold at most {capacity}")
    return problems


def layout_problems(groups: dict[str, dict[str, Any]]) -> list[str]:
    """Head: no GPU, no custom resource. learner and rollout groups exist; rollout scales from zero; a GPU
    group's custom amount never admits more one-GPU actors than it has GPUs."""
    problems = []
    for name, g in groups.items():
        if g["head"] and (g["custom"] or (g["gpu"] or 0) > 0):
            problems.append(f"head group {name!r} must be CPU only with no custom resources: {g}")
    for role in ("learner", "rollout"):
        if role not in groups:
            problems.append(f"no {role!r} worker group")
            continue
        g = groups[role]
        if g["custom"].get(role, 0) < 1:
            problems.append(f"group {role!r} does not declare the custom resource {role!r}: {g['custom']}")
        if g["gpu"] is not None and g["custom"].get(role, 0) > g["gpu"]:
            problems.append(f"group {role!r} declares {g['custom'].get(role)} {role!r} but only {g['gpu']} GPUs")
        if not 0 <= g["min"] <= g["max"] or g["max"] < 1:
            problems.append(f"group {role!r}: min {g['min']} / max {g['max']} is not a usable range")
    if "rollout" in groups and groups["rollout"]["min"] != 0:
        problems.append(f"rollout group must scale from zero, min is {groups['rollout']['min']}")
    return problems


def node_type_problems(groups: dict[str, dict[str, Any]], defined: dict[str, dict[str, Any]]) -> list[str]:
    """The groups are the defined node types: the same names, the same custom resources, the same min/max workers
    (the head's are fixed by the config's form), the same GPUs a node where the config states them (AWS infers them
    from the instance type)."""
    problems = []
    if set(groups) != set(defined):
        problems.append(f"node types {sorted(groups)}, cluster/node_types.yaml defines {sorted(defined)}")
    for name in set(groups) & set(defined):
        group, spec = groups[name], defined[name]
        if group["custom"] != spec["resources"]:
            problems.append(f"{name}: custom resources {group['custom']}, defined {spec['resources']}")
        if group["gpu"] is not None and group["gpu"] != spec["gpus"]:
            problems.append(f"{name}: {group['gpu']} GPUs a node, defined {spec['gpus']}")
        if name != HEAD and (group["min"], group["max"]) != (spec["min_workers"], spec["max_workers"]):
            problems.append(f"{name}: min/max workers {group['min']}/{group['max']}, defined "
                            f"{spec['min_workers']}/{spec['max_workers']}")
    return problems


def launcher_security_problems(config: dict[str, Any]) -> list[str]:
    """The head's dashboard binds to loopback; every `ray start` keeps token auth on; the token is synced."""
    problems = []
    head_starts = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    if not head_starts:
        problems.append("no `ray start --head` in head_start_ray_commands")
    for command in head_starts:
        if "--dashboard-host=127.0.0.1" not in command:
            problems.append(f"head start must pass --dashboard-host=127.0.0.1 (Ray's launcher default is 0.0.0.0): {command}")
    for command in head_starts + [c for c in config.get("worker_start_ray_commands", []) if "ray start" in c]:
        if "RAY_AUTH_MODE=token" not in command:
            problems.append(f"`ray start` without RAY_AUTH_MODE=token: {command}")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("file_mounts does not sync ~/.ray/auth_token to the nodes")
    return problems


def kuberay_security_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head service type {head.get('serviceType')!r}: only ClusterIP keeps the dashboard in the cluster")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress exposes the dashboard")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"authOptions.mode must be 'token', got {spec.get('authOptions')!r}")
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is not true: the worker groups would never scale")
    return problems


def text_exposure_problems(text: str) -> list[str]:
    problems = []
    for needle in ("--dashboard-host=0.0.0.0", "--dashboard-host 0.0.0.0", "dashboard-host: 0.0.0.0",
                   "dashboard-host: \"0.0.0.0\"", "LoadBalancer", "NodePort", "RAY_AUTH_MODE=disabled"):
        if needle in text:
            problems.append(f"found {needle!r}")
    return problems


# ---------------------------------------------------------------------------------------------- launcher configs


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    return json.loads(RAY_SCHEMA.read_text())


@pytest.fixture(scope="module")
def demands() -> dict[str, dict[str, Any]]:
    found = job_demands()
    asked = {name for d in found.values() for name in d["total"]}
    # Not vacuous: the GPU recipe pins roles to node groups by custom resource.
    assert {"learner", "rollout"} <= asked, f"expected the jobs to ask for learner and rollout, got {asked}"
    return found


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_FILES))
def test_launcher_config_matches_rays_schema(cloud, ray_schema):
    config = _yaml(LAUNCHER_FILES[cloud])
    jsonschema.validate(config, ray_schema)
    assert config["provider"]["type"] == cloud
    # What `ray up` does with the file: fill in the provider's defaults, then Ray's own validation (schema plus
    # head_node_type / min-max checks).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # The provider defaults (dashboard on 0.0.0.0) must not have come back through the merge.
    assert launcher_security_problems(prepared) == []


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_FILES))
def test_launcher_node_groups(cloud, demands):
    config = _yaml(LAUNCHER_FILES[cloud])
    groups = launcher_groups(config)
    assert node_type_problems(groups, node_types()) == []
    assert layout_problems(groups) == []
    assert coverage_problems(groups, demands) == []
    assert launcher_security_problems(config) == []
    setup = " ".join(config["setup_commands"])
    assert "[gpu]" in setup and "ray[default]==" + ray.__version__ in setup


# ---------------------------------------------------------------------------------------------- KubeRay


def test_raycluster_required_fields_and_autoscaler_parse(demands):
    cr = _yaml(RAYCLUSTER_FILE)
    assert missing_paths(cr, RAYCLUSTER_REQUIRED) == []
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    for group in cr["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert _gpu_limit(group) >= 1, f"{group['groupName']} has no nvidia.com/gpu limit"
    groups = kuberay_groups(cr["spec"])
    assert node_type_problems(groups, node_types()) == []
    assert layout_problems(groups) == []
    assert coverage_problems(groups, demands) == []
    assert kuberay_security_problems(cr["spec"]) == []
    # Ray's KubeRay autoscaler reads the same CR into node types: its view must agree with ours.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    parsed = _derive_autoscaling_config_from_ray_cr({**cr, "metadata": {**cr["metadata"], "namespace": "default"}})
    parsed_types = parsed["available_node_types"]
    for name in ("learner", "rollout"):
        assert parsed_types[name]["resources"][name] == groups[name]["custom"][name]
        assert parsed_types[name]["resources"]["GPU"] == groups[name]["gpu"]
        assert parsed_types[name]["min_workers"] == groups[name]["min"]


def test_rayjob_runs_a_real_job_on_the_same_cluster_spec():
    rayjob = _yaml(RAYJOB_FILE)
    assert missing_paths(rayjob, RAYJOB_REQUIRED) == []
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "give exactly one of rayClusterSpec, clusterSelector"
    # The entrypoint names a job file that exists and loads, with its overrides.
    words = spec["entrypoint"].split("&&")[-1].split()
    assert words[:2] == ["pear-ray", "run"], spec["entrypoint"]
    job_path, overrides = words[2], words[3:]
    assert (ROOT / job_path).is_file(), f"entrypoint runs {job_path}, which is not in the repository"
    load_job(ROOT / job_path, overrides)
    if "rayClusterSpec" in spec:
        # A verbatim copy of the RayCluster's spec: the two files must not drift apart.
        assert spec["rayClusterSpec"] == _yaml(RAYCLUSTER_FILE)["spec"]
        assert missing_paths({"spec": spec["rayClusterSpec"]}, [p for p in RAYCLUSTER_REQUIRED if p.startswith("spec.")]) == []
    else:
        assert spec["clusterSelector"].get("ray.io/cluster") == _yaml(RAYCLUSTER_FILE)["metadata"]["name"]


# ---------------------------------------------------------------------------------------------- the test cluster


def test_the_local_autoscaling_cluster_has_the_defined_node_types_cpu_only(ray_schema):
    defined = node_types()
    config = fake_provider_config(6379, worker_cpus={"rollout": 2}, max_workers={"rollout": 2}, idle_timeout_s=6)
    jsonschema.validate(config, ray_schema)
    from ray.autoscaler._private.util import validate_config

    validate_config(config)  # what the autoscaler checks when the head starts on it
    assert config["head_node_type"] == FAKE_HEAD_TYPE
    assert config["provider"]["module"] == "reclaimable_provider.ReclaimableFakeProvider"  # the fake one, killed nodes unlisted
    groups = launcher_groups(config)
    groups[HEAD] = groups.pop(FAKE_HEAD_TYPE)
    assert layout_problems(groups) == []
    rollout_max = {**defined, "rollout": {**defined["rollout"], "max_workers": 2}}  # the test's override
    assert node_type_problems(groups, rollout_max) == []
    for name, node_type in config["available_node_types"].items():
        assert node_type["resources"].get("GPU", 0) == 0, name  # CPU only: the custom resources alone place roles
    assert config["available_node_types"]["rollout"]["resources"]["CPU"] == 2
    assert config["available_node_types"]["learner"]["resources"]["CPU"] == 1


# ---------------------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_config_exposes_the_dashboard_or_disables_auth(path):
    # On the parsed content (comments may name what is avoided), flow style normalised by the dump.
    assert text_exposure_problems(yaml.safe_dump(_yaml(path), width=10_000)) == []


# ---------------------------------------------------------------------------------------------- the checks can fail


def test_checks_catch_broken_configs(ray_schema, demands):
    aws = _yaml(LAUNCHER_FILES["aws"])

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["learner"]["resources"] = {"learner": 0.5}  # Ray wants integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)

    bad = copy.deepcopy(aws)
    bad["head_start_ray_commands"][-1] = bad["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
    assert launcher_security_problems(bad) and text_exposure_problems(yaml.safe_dump(bad))

    bad = copy.deepcopy(aws)
    bad["worker_start_ray_commands"][-1] = bad["worker_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token ", "")
    assert launcher_security_problems(bad)

    bad = copy.deepcopy(aws)
    del bad["available_node_types"]["rollout"]["resources"]["rollout"]
    problems = coverage_problems(launcher_groups(bad), demands)
    assert any("rollout" in p for p in problems), problems

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["learner"]["max_workers"] = 0  # no capacity for the learner ranks
    assert coverage_problems(launcher_groups(bad), demands) and layout_problems(launcher_groups(bad))

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["rollout"]["min_workers"] = 1
    assert layout_problems(launcher_groups(bad))

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["rollout"]["max_workers"] = 4  # drifted from cluster/node_types.yaml
    bad["available_node_types"]["learner"]["resources"] = {"learner": 8, "extra": 1}
    bad["available_node_types"]["spare"] = bad["available_node_types"]["rollout"]
    assert len(node_type_problems(launcher_groups(bad), node_types())) == 3

    cr = _yaml(RAYCLUSTER_FILE)
    bad = copy.deepcopy(cr)
    del bad["spec"]["workerGroupSpecs"][1]["minReplicas"]
    del bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert missing_paths(bad, RAYCLUSTER_REQUIRED) == [
        "spec.headGroupSpec.template.spec.containers[0].image",
        "spec.workerGroupSpecs[1].minReplicas",
    ]

    bad = copy.deepcopy(cr)
    bad["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    bad["spec"]["authOptions"] = {"mode": "disabled"}
    assert len(kuberay_security_problems(bad["spec"])) == 2

    bad = copy.deepcopy(cr)
    bad["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '{"learner": 8}'  # unquoted: misread by Ray
    with pytest.raises(ValueError):
        kuberay_groups(bad["spec"])

    bad = copy.deepcopy(cr)
    bad["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"learner\\": 16}"'  # more than 8 GPUs
    assert layout_problems(kuberay_groups(bad["spec"]))
    assert node_type_problems(kuberay_groups(bad["spec"]), node_types())
