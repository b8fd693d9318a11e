"""Offline checks of the Kubernetes manifests in k8s/: no API server, no Ray cluster.

- Every manifest validates against the KubeRay CRD schemas in ../shared/kuberay/, strictly (an
  unknown field is an error, as with kubeconform -strict); Services are checked by structure.
- The rules KubeRay's operator enforces beyond the schema (labels, resources, autoscaler v2).
- serveConfigV2 parses with Ray's ServeDeploySchema and our parse_config, and Ray Serve accepts
  every deployment's options.
- Placement: each deployment fits exactly the worker group meant for it and never the head, by
  our check and by Ray's own autoscaler (KubeRay config parser + v2 scheduler); a tensor-parallel
  verifier tier's placement group (STRICT_PACK) fits one pod of its group, every bundle at once.
- Security: non-root pods, the dashboard reachable only inside the cluster, the token optional.
- Drift: rendering again gives the committed k8s/rayservice.yaml.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from via_sd_ray.config import load_config, parse_config
from via_sd_ray.deploy import k8s
from via_sd_ray.errors import ConfigError
from via_sd_ray.serving.grpc_service import SERVICER_FUNCTIONS
from via_sd_ray.serving.health import ROUTER_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
SHARED_CRDS = ROOT.parent / "shared" / "kuberay"
GPU_CONFIG = ROOT / "deployments" / "via_sd.gpu.yaml"
TEMPLATE = ROOT / "k8s" / "rayservice.template.yaml"
RENDERED = ROOT / "k8s" / "rayservice.yaml"
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
GROUP_OF = {"Ingress": "frontend", "Router": "frontend", "Drafter": "tiers-l4", "FullVerifier": "tiers-l4"}
# the tensor-parallel variant below: both verifier tiers at tp 2 on a group of 2-H100 pods
TP_GROUP_OF = {**GROUP_OF, "SlimVerifier": "verifiers-h100", "FullVerifier": "verifiers-h100"}
DASHBOARD_PORT = 8265

needs_crds = pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason=f"no KubeRay CRDs at {SHARED_CRDS} "
                                "(the `shared` folder beside the checkout); schema validation skipped")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return k8s.find_kind(documents(RENDERED), "RayService")


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def tp_variant(serve_config, rayservice) -> tuple[dict, dict]:
    """The shipped manifests changed as the GPU config's comments say for a verifier that needs tensor
    parallelism: DeepSpeed at tp 2 on both verifier tiers (a slim tier deployed), each replica a
    STRICT_PACK placement group of two one-GPU bundles, and a worker group of 2-H100 pods for them."""
    config = copy.deepcopy(serve_config)
    args = config["applications"][0]["args"]
    args["models"]["verifier"].update(engine="deepspeed", tensor_parallel_size=2)
    args["serving"]["slim_tier"] = "on"
    deployments = args["serving"]["deployments"]
    for name in ("SlimVerifier", "FullVerifier"):
        deployments[name] = {**deployments["FullVerifier"], "ray_actor_options": {"num_cpus": 2, "num_gpus": 1},
                             "placement_group_bundles": [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}],
                             "placement_group_strategy": "STRICT_PACK",
                             "placement_group_bundle_label_selector": [{"ray.io/accelerator-type": "H100"}]}
    service = copy.deepcopy(rayservice)
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (tiers,) = [g for g in groups if g["groupName"] == "tiers-l4"]
    verifiers = copy.deepcopy(tiers)
    verifiers.update(groupName="verifiers-h100", labels={"ray.io/accelerator-type": "H100"}, maxReplicas=8)
    gpus = {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "2"}
    verifiers["template"]["spec"]["containers"][0]["resources"] = {"requests": gpus, "limits": gpus}
    groups.append(verifiers)
    return config, service


def pod_groups(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


# ---- CRD schemas, strictly ---------------------------------------------------------------------


def strict(node: dict) -> dict:
    """A CRD schema as kubeconform -strict applies it: an object that lists its properties rejects
    others unless it preserves unknown fields; int-or-string and nullable spelled out for jsonschema."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    return node


@pytest.fixture(scope="module")
def validators() -> dict:
    import jsonschema

    found = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((SHARED_CRDS / name).read_text())
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            found[(f"{crd['spec']['group']}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return found


def schema_errors(validators: dict, doc: dict) -> list[str]:
    validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no CRD for apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r}"]
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_crds(path, validators):
    for doc in documents(path):
        if doc["kind"] == "Service":
            check_service(doc)
        else:
            assert doc["apiVersion"] == "ray.io/v1", path
            assert schema_errors(validators, doc) == [], f"{path.name}: {doc['kind']}"


@needs_crds
def test_strict_validation_rejects_what_kubeconform_rejects(validators, rayservice):
    assert schema_errors(validators, rayservice) == []
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert any("rayStartParam" in e and "Additional properties" in e for e in schema_errors(validators, typo))
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in schema_errors(validators, wrong_type))
    not_a_string = copy.deepcopy(rayservice)
    not_a_string["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("num-cpus" in e for e in schema_errors(validators, not_a_string))
    int_or_string = copy.deepcopy(rayservice)
    int_or_string["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": 2, "memory": "8Gi"}}
    assert schema_errors(validators, int_or_string) == []


def test_kuberay_operator_rules(rayservice):
    """What KubeRay's validation (ray-operator/controllers/ray/utils/validation.go) rejects beyond the CRD."""
    from ray._private.label_utils import validate_node_label_syntax

    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["rayVersion"] == "2.60.0"
    for group in pod_groups(rayservice):
        params = group.get("rayStartParams") or {}
        assert "labels" not in params, "labels go in the group's `labels` field"
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params))
        validate_node_label_syntax(group.get("labels") or {})
        pod = group["template"]["spec"]
        assert pod.get("restartPolicy", "Never") == "Never", "autoscaler v2 needs restartPolicy Never"
        assert all(env["name"] != "RAY_enable_autoscaler_v2" for env in pod["containers"][0].get("env", []))
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]


# ---- Services and the dashboard ----------------------------------------------------------------


def check_service(service: dict) -> None:
    assert service["apiVersion"] == "v1" and service["kind"] == "Service"
    spec = service["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP", f"{service['metadata']['name']} is exposed outside"
    ports = [p["port"] for p in spec["ports"]]
    assert ports and DASHBOARD_PORT not in ports and all(p.get("targetPort", p["port"]) != DASHBOARD_PORT
                                                        for p in spec["ports"])


def test_http_and_grpc_services_and_a_private_dashboard(rayservice):
    assert RENDERED in MANIFESTS and TEMPLATE in MANIFESTS
    services = [d for path in MANIFESTS for d in documents(path) if d["kind"] == "Service"]
    http = rayservice["spec"]["serveService"]
    for service in (*services, {"apiVersion": "v1", "kind": "Service", **http}):
        check_service(service)
    assert [p["port"] for p in http["spec"]["ports"]] == [8000] and http["spec"]["ports"][0]["name"] == "serve"
    grpc = [s for s in services if 9000 in [p["port"] for p in s["spec"]["ports"]]]
    assert grpc and all(s["spec"]["selector"]["ray.io/serve"] == "true" for s in grpc)
    if rayservice["spec"].get("excludeHeadPodFromServeSvc"):  # gRPC keeps off the head too
        assert all(s["spec"]["selector"]["ray.io/node-type"] == "worker" for s in grpc)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert {d["kind"] for path in MANIFESTS for d in documents(path)} <= {"RayService", "Service"}



def test_serving_pods_are_ready_only_when_every_tier_is(rayservice):
    """Every pod the Services send traffic to (the workers) is ready by the app's /health, which answers
    503 until every tier has loaded and warmed up; liveness stays KubeRay's (raylet) default."""
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/health", "port": 8000}, group["groupName"]
        assert probe["timeoutSeconds"] > ROUTER_TIMEOUT_S  # a not-ready answer may wait that long for the router
        assert "livenessProbe" not in container, group["groupName"]


# ---- serveConfigV2 -----------------------------------------------------------------------------


def test_gpu_config_parses_with_tiers_sharing_a_gpu():
    """The shipped pair: Drafter and FullVerifier share one L4 by fractional num_gpus, no tensor
    parallelism, no SlimVerifier (the profile routes no block to it, which auto finds too)."""
    from ray.util.accelerators import accelerators

    from via_sd_ray.serving.autoscaling import TierLoadPolicy

    config = load_config(GPU_CONFIG)
    assert config.slim.layers and config.models.drafter.dtype == "bfloat16"
    assert config.models.verifier.tensor_parallel_size == 1 and config.models.verifier.engine != "deepspeed"
    assert config.serving.slim_tier == "off" and not config.router.routes_to_slim()
    assert config.model_copy(update={"serving": config.serving.model_copy(update={"slim_tier": "auto"})}
                             ).deployment_names() == config.deployment_names()
    assert config.deployment_names() == ("Ingress", "Router", "Drafter", "FullVerifier")
    gpus = 0.0
    for name in config.deployment_names():
        options = config.serving.deployments[name]
        actor = options.ray_actor_options
        assert {"min_replicas", "max_replicas", "upscale_delay_s",
                "downscale_delay_s"} <= set(options.autoscaling_config), name
        assert actor["num_cpus"] > 0, f"{name} would fit the head"
        assert not options.placement_group_bundles, name
        if name in ("Drafter", "FullVerifier"):  # tiers scale on their own load, with a target each
            policy = options.autoscaling_config["policy"]
            assert policy["policy_function"] == "via_sd_ray.serving.autoscaling:TierLoadPolicy", name
            TierLoadPolicy(**policy["policy_kwargs"])
            assert 0 < actor["num_gpus"] < 1 and "accelerator_type" not in actor, \
                "the KubeRay autoscaler cannot scale on accelerator_type"
            assert actor["label_selector"] == {"ray.io/accelerator-type": accelerators.NVIDIA_L4}
            gpus += actor["num_gpus"]
        else:
            assert not actor.get("num_gpus")
    assert gpus == 1.0, "one replica of each tier fills one GPU"


def test_slim_tier_auto_follows_the_router_band():
    band = parse_config({"router": {"direct_threshold": 0.9, "slim_threshold": 0.5}})
    assert band.router.routes_to_slim() and "SlimVerifier" in band.deployment_names()
    none = parse_config({"router": {"direct_threshold": 0.9, "slim_threshold": 0.9}})
    assert not none.router.routes_to_slim() and "SlimVerifier" not in none.deployment_names()
    preset = parse_config({"router": {"direct_threshold": 0.9, "slim_threshold": 0.9,
                                      "presets": {"fast": {"slim_threshold": 0.4}}}})
    assert preset.router.routes_to_slim(), "a preset's band deploys the slim tier too"
    sd_default = parse_config({"router": {"mode": "sd"}})  # a via-sd request still routes by the thresholds
    assert sd_default.slim_deployed()
    assert parse_config({"serving": {"slim_tier": False}}).deployment_names() == (
        "Ingress", "Router", "Drafter", "FullVerifier"), "YAML's bare off reads as false"
    assert parse_config({"serving": {"slim_tier": True}, **none.model_dump(include={"router"})}).slim_deployed()


def test_serve_config_v2_parses_with_ray(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == list(SERVICER_FUNCTIONS)  # gRPC health and reflection v1
    (app,) = serve_config["applications"]
    profile = app["args"]["profile"]
    assert profile.startswith(k8s.APP_ROOT + "/"), "the profile must resolve inside the image"
    local = {**app["args"], "profile": profile.removeprefix(k8s.APP_ROOT + "/")}
    assert parse_config(local, base_dir=ROOT).slim.layers


@pytest.mark.parametrize("variant", ["shipped", "tensor-parallel"])
def test_ray_serve_accepts_every_deployments_options(variant, serve_config, tp_variant):
    from ray import serve

    serve_config = serve_config if variant == "shipped" else tp_variant[0]
    config = parse_config({**serve_config["applications"][0]["args"], "profile": None})

    class Replica:
        pass

    for name in config.deployment_names():
        options = config.serving.deployments[name].serve_options()
        deployment = serve.deployment(Replica, name=name).options(**options)
        if "placement_group_bundles" in options:  # Serve checks the actor fits bundle 0
            replica = deployment._replica_config
            assert replica.placement_group_bundles == options["placement_group_bundles"], name
            assert replica.placement_group_strategy == "STRICT_PACK", name
            (selector,) = options["placement_group_bundle_label_selector"]
            assert replica.placement_group_bundle_label_selector == [selector] * len(options["placement_group_bundles"])
        else:
            assert deployment.ray_actor_options["label_selector"] == options["ray_actor_options"]["label_selector"]


# ---- placement ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["shipped", "tensor-parallel"])
def test_each_deployment_fits_its_group_only_and_never_the_head(variant, serve_config, rayservice, tp_variant):
    if variant == "tensor-parallel":
        serve_config, rayservice = tp_variant
    group_of = GROUP_OF if variant == "shipped" else TP_GROUP_OF
    assert k8s.placement_problems(serve_config, rayservice) == []
    head, workers = k8s.cluster_groups(rayservice)
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert head.resources.get("CPU", 0) == 0 and head.resources.get("GPU", 0) == 0
    config = parse_config({**serve_config["applications"][0]["args"], "profile": None})
    demands = k8s.replica_demands(serve_config)
    assert [d.deployment for d in demands] == list(config.deployment_names())
    for demand in demands:
        assert not k8s.replicas_per_node(demand, head), demand
        fitting = [g.name for g in workers if k8s.replicas_per_node(demand, g)]
        assert fitting == [group_of[demand.deployment]], demand
    tp = config.models.verifier.tensor_parallel_size
    for demand in demands:
        if tp > 1 and demand.deployment in ("SlimVerifier", "FullVerifier"):  # a whole placement group in one pod
            assert len(demand.bundles) == tp and demand.resources["GPU"] == tp, demand
            (group,) = [g for g in workers if g.name == group_of[demand.deployment]]
            assert group.resources["GPU"] == tp and k8s.replicas_per_node(demand, group) == 1, group
    if variant == "shipped":  # a pod of tiers-l4 holds a Drafter and a FullVerifier replica at once
        (group,) = [g for g in workers if g.name == "tiers-l4"]
        together = [d for d in demands if d.deployment in ("Drafter", "FullVerifier")]
        for resource, capacity in group.resources.items():
            assert sum(d.resources.get(resource, 0) for d in together) <= capacity, resource


def test_placement_groups_are_checked_bundle_by_bundle_on_one_pod(tp_variant):
    """STRICT_PACK: all bundles on one pod. Bundles that each fit a pod but not together, or one
    bundle asking for another GPU type, fit nowhere; the count must match the verifier's ranks."""
    serve_config, rayservice = tp_variant
    broken = copy.deepcopy(serve_config)
    deployments = broken["applications"][0]["args"]["serving"]["deployments"]
    full = deployments["FullVerifier"]
    full["placement_group_bundles"] = full["placement_group_bundles"] + [{"CPU": 2, "GPU": 1}]  # 3 GPUs, pods have 2
    slim = deployments["SlimVerifier"]
    slim["placement_group_bundle_label_selector"] = [{"ray.io/accelerator-type": "H100"},
                                                     {"ray.io/accelerator-type": "L40S"}]
    problems = k8s.placement_problems(broken, rayservice)
    assert any(p.startswith("FullVerifier: no worker group fits {CPU: 6, GPU: 3} in one node, as 3 STRICT_PACK")
               for p in problems), problems
    assert any(p.startswith("FullVerifier: 3 placement_group_bundles, expected 2") for p in problems), problems
    assert any(p.startswith("SlimVerifier: no worker group fits") and "L40S" in p for p in problems), problems
    assert len(problems) == 3, problems

    spread = copy.deepcopy(serve_config)
    full = spread["applications"][0]["args"]["serving"]["deployments"]["FullVerifier"]
    full["placement_group_strategy"] = "PACK"  # bundles may land on different pods: each checked alone
    full["ray_actor_options"]["label_selector"] = {"ray.io/accelerator-type": "H100"}
    problems = k8s.placement_problems(spread, rayservice)
    assert [d.deployment for d in k8s.replica_demands(spread)][-2:] == ["FullVerifier bundle 0",
                                                                       "FullVerifier bundle 1"]
    assert any(p.startswith("FullVerifier: placement_group_strategy 'PACK', expected 'STRICT_PACK'")
               for p in problems), problems
    assert any(p.startswith("FullVerifier: ray_actor_options.label_selector with placement_group_bundles")
               for p in problems), problems
    assert len(problems) == 2, problems


def test_a_placement_group_never_fits_the_head(tp_variant):
    serve_config, rayservice = tp_variant
    head_like = copy.deepcopy(serve_config)
    full = head_like["applications"][0]["args"]["serving"]["deployments"]["FullVerifier"]
    full["ray_actor_options"] = {"num_cpus": 0}
    full["placement_group_bundles"] = [{"CPU": 0}, {"CPU": 0}]
    full["placement_group_bundle_label_selector"] = None
    problems = k8s.placement_problems(head_like, rayservice)
    assert any(p.startswith("FullVerifier: fits on the head") for p in problems), problems


def test_placement_problems_are_reported(serve_config, rayservice):
    broken = copy.deepcopy(serve_config)
    deployments = broken["applications"][0]["args"]["serving"]["deployments"]
    deployments["Drafter"]["ray_actor_options"]["resources"] = {"TPU": 1}
    deployments["Router"]["ray_actor_options"] = {"num_cpus": 0}
    deployments["FullVerifier"]["autoscaling_config"]["max_replicas"] = 9
    problems = k8s.placement_problems(broken, rayservice)
    assert any(p.startswith("Drafter: no worker group fits") and "TPU" in p for p in problems), problems
    assert any(p.startswith("Router: fits on the head") for p in problems), problems
    assert any(p.startswith("FullVerifier: up to 9 replicas") and "at most 4" in p for p in problems), problems
    assert len(problems) == 3


def test_render_refuses_a_config_that_does_not_fit(tmp_path):
    config = yaml.safe_load(GPU_CONFIG.read_text())
    drafter = config["applications"][0]["args"]["serving"]["deployments"]["Drafter"]
    drafter["ray_actor_options"]["label_selector"] = {"ray.io/accelerator-type": "A100"}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="Drafter: no worker group fits"):
        k8s.render_rayservice(path, TEMPLATE, project_root=ROOT)


def ray_label_selector(selector: dict[str, str]) -> list | None:
    from ray.core.generated.common_pb2 import LabelSelectorOperator as Op

    constraints = []
    for key, value in selector.items():
        negated, value = value.startswith("!"), value.removeprefix("!")
        values = value[3:-1].split(",") if value.startswith("in(") else [value]
        constraints.append((key, Op.LABEL_OPERATOR_NOT_IN if negated else Op.LABEL_OPERATOR_IN, values))
    return [constraints] if constraints else None


@pytest.mark.parametrize("variant", ["shipped", "tensor-parallel"])
def test_ray_autoscaler_adds_a_node_of_the_intended_group(variant, serve_config, rayservice, tp_variant):
    """Ray's KubeRay config parser reads the groups as we do, and its v2 scheduler answers a pending
    replica of each deployment by launching one node of the group meant for it. (Ray internals, as
    of the pinned ray==2.60.0: an upgrade that moves them fails here first.)"""
    if variant == "tensor-parallel":
        serve_config, rayservice = tp_variant
    group_of = GROUP_OF if variant == "shipped" else TP_GROUP_OF
    from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec
    from ray.autoscaler.v2.instance_manager.config import NodeTypeConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest, ResourceRequestByCount

    node_types = _generate_available_node_types_from_ray_cr_spec(rayservice["spec"]["rayClusterConfig"])
    head, workers = k8s.cluster_groups(rayservice)
    for group in (head, *workers):
        ray_view = node_types["headgroup" if group is head else group.name]
        assert {k: v for k, v in ray_view["resources"].items() if v} == group.resources, group.name
        assert ray_view["labels"] == group.labels, group.name
    configs = {name: NodeTypeConfig(name=name, min_worker_nodes=0, max_worker_nodes=t["max_workers"],
                                    resources=t["resources"], labels=t["labels"])
               for name, t in node_types.items() if t["max_workers"]}
    for demand in k8s.replica_demands(serve_config):
        if demand.bundles:  # a STRICT_PACK placement group, as the GCS reports it: a gang with affinity
            affinity = [(ResourceRequestUtil.PlacementConstraintType.AFFINITY, "_PG_via_sd", "")]
            gang = GangResourceRequest(requests=[
                ResourceRequestUtil.make(b.resources, affinity, ray_label_selector(b.label_selector))
                for b in demand.bundles])
            scheduling = SchedulingRequest(disable_launch_config_check=True, node_type_configs=configs,
                                           gang_resource_requests=[gang])
        else:
            request = ResourceRequestUtil.make(demand.resources,
                                               label_selectors=ray_label_selector(demand.label_selector))
            scheduling = SchedulingRequest(disable_launch_config_check=True, node_type_configs=configs,
                                           resource_requests=[ResourceRequestByCount(request=request, count=1)])
        reply = ResourceDemandScheduler().schedule(scheduling)
        launched = {launch.instance_type: launch.count for launch in reply.to_launch}
        assert launched == {group_of[demand.deployment]: 1}, demand
        assert not reply.infeasible_gang_resource_requests, demand


# ---- security ----------------------------------------------------------------------------------


def test_pods_run_as_non_root_with_an_optional_token(rayservice):
    for group in pod_groups(rayservice):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and not security.get("privileged")
            (token,) = [e for e in container["env"] if e["name"] == "VIA_SD_API_TOKEN"]
            assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    autoscaler = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False


def test_image_runs_as_non_root_from_the_app_root():
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert workdirs[-1] == k8s.APP_ROOT, "render's --app-root default must be the image's WORKDIR"
    assert "python -m via_sd_ray.serving.protogen" in dockerfile


# ---- drift -------------------------------------------------------------------------------------


def test_rendered_rayservice_is_current():
    rendered = k8s.render_rayservice(GPU_CONFIG, TEMPLATE, project_root=ROOT)
    assert rendered == RENDERED.read_text(), "k8s/rayservice.yaml is stale: run `via-sd k8s render`"


def test_render_command_checks_and_writes(tmp_path, monkeypatch, capsys):
    from via_sd_ray.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "rayservice.yaml"
    out.write_text(RENDERED.read_text().replace("maxReplicas: 4", "maxReplicas: 5", 1))
    assert main(["k8s", "render", "--out", str(out), "--check"]) == 1
    assert main(["k8s", "render", "--out", str(out)]) == 0
    assert main(["k8s", "render", "--out", str(out), "--check"]) == 0
    assert out.read_text() == RENDERED.read_text()
    assert "up to date" in capsys.readouterr().out
