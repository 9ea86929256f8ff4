"""Every overlay renders offline, every object is valid against the Kubernetes schemas, and the pieces fit together
(Services select pods, mounts name objects that exist, the gateway routes to the vLLM Services that exist)."""

# The session fixtures are imported from k8s_manifests (a conftest.py here would shadow tests/conftest.py), so
# test arguments shadow those imports by design.
# ruff: noqa: F811

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from k8s_manifests import (  # noqa: F401 (session fixtures)
    NAMESPACE,
    OUT_OF_BAND_SECRETS,
    OVERLAYS,
    by_kind,
    containers,
    everything,
    find,
    ident,
    pod_labels,
    rendered,
    selector_matches,
    toolbox,
    workloads,
)

# The oldest Kubernetes we claim (PodSecurity labels, autoscaling/v2, policy/v1 are all GA there) and the newest
# schemas kubernetes-validate ships. strict: unknown fields are errors, so a typo cannot hide.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# Custom resources, whose schemas ship with their operators; checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor"}


def test_overlays_exist():
    assert {"cpu-dev", "gpu-prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(everything, version):
    problems = []
    for where, obj in everything:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            problems.append(f"{where}: {ident(obj)} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespaced_object_lands_in_the_sovereign_namespace(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, ident(obj)
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sovereign", ident(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_has_the_components_the_platform_needs(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "PersistentVolumeClaim", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "Job"} <= kinds
    find(objects, "Deployment", "sovereign-gateway")
    assert by_kind(objects, "Deployment"), "no vLLM Deployment"
    serving = [o for o in by_kind(objects, "Deployment") if pod_labels(o)["app.kubernetes.io/component"] == "serving"]
    assert serving, "no vLLM Deployment"


def test_cpu_dev_runs_postgres_and_redis_in_cluster_and_gpu_prod_uses_external_ones(rendered):
    dev = {(o["kind"], o["metadata"]["name"]) for o in rendered["cpu-dev"]}
    prod = {(o["kind"], o["metadata"]["name"]) for o in rendered["gpu-prod"]}
    assert {("StatefulSet", "postgres"), ("StatefulSet", "redis"), ("Service", "postgres"), ("Service", "redis")} <= dev
    assert not {k for k, _ in prod} & {"StatefulSet"}
    gateway = find(rendered["gpu-prod"], "Deployment", "sovereign-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    for var in ("SOVEREIGN_GATEWAY_DATABASE_URL", "SOVEREIGN_GATEWAY_REDIS_URL", "SOVEREIGN_GATEWAY_BOOTSTRAP_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "sovereign-gateway-secrets", var


def test_gpu_prod_has_monitoring_and_the_dashboard(rendered):
    objects = rendered["gpu-prod"]
    monitor = find(objects, "ServiceMonitor", "sovereign")
    dashboards = find(objects, "ConfigMap", "sovereign-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "sovereign-gateway.json" in dashboards["data"]
    # The ServiceMonitor's selector picks the gateway and every vLLM Service, and the port it names exists on each.
    sel = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in by_kind(objects, "Service") if selector_matches(sel, s["metadata"]["labels"])]
    names = {s["metadata"]["name"] for s in scraped}
    assert "sovereign-gateway" in names and any(n.startswith("vllm-") for n in names), names
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for svc in scraped:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}, svc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_name_their_ports(rendered, overlay):
    objects = rendered[overlay]
    for svc in by_kind(objects, "Service"):
        sel = svc["spec"]["selector"]
        targets = [o for o, _ in workloads(objects) if o["kind"] != "Job" and selector_matches(sel, pod_labels(o))]
        assert len(targets) == 1, f"{ident(svc)} selects {[ident(t) for t in targets]}"
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{ident(svc)}: targetPort {p['targetPort']} not on {ident(targets[0])}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_and_pdbs_point_at_existing_workloads(rendered, overlay):
    objects = rendered[overlay]
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        find(objects, ref["kind"], ref["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        matched = [o for o, _ in workloads(objects) if o["kind"] != "Job" and selector_matches(sel, pod_labels(o))]
        assert len(matched) == 1, ident(pdb)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_volume_and_secret_reference_resolves(rendered, overlay):
    """ConfigMaps and PVCs come with the overlay; Secrets are the documented, out-of-band ones."""
    objects = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for obj, spec in workloads(objects):
        claim_templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claim_templates, f"{ident(obj, c)}: {m['name']}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in OUT_OF_BAND_SECRETS, f"{ident(obj, c)}: undocumented Secret {ref['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, f"{ident(obj)}: {v['configMap']['name']}"
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, f"{ident(obj)}: {claim}"
            assert "hostPath" not in v, f"{ident(obj)} mounts a hostPath"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_routes_each_model_to_its_vllm_service(rendered, overlay):
    objects = rendered[overlay]
    config = yaml.safe_load(find(objects, "ConfigMap", _gateway_config_name(objects))["data"]["gateway.yaml"])
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    served = {}
    for d in by_kind(objects, "Deployment"):
        if pod_labels(d)["app.kubernetes.io/component"] == "serving":
            env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            served[env["SOVEREIGN_MODEL"]] = d
    assert set(config["models"]) == set(served), "gateway models and vLLM Deployments differ"
    for model, urls in config["models"].items():
        for url in urls:
            host, _, port = url.removeprefix("http://").partition(":")
            svc = services[host]
            assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, url
            assert selector_matches(svc["spec"]["selector"], pod_labels(served[model])), f"{url} is not {model}"


def _gateway_config_name(objects) -> str:
    gw = find(objects, "Deployment", "sovereign-gateway")["spec"]["template"]["spec"]
    return next(v["configMap"]["name"] for v in gw["volumes"] if v["name"] == "config")


def test_the_deploy_guide_names_only_paths_that_exist():
    from k8s_manifests import REPO

    guide = (REPO / "deploy" / "k8s" / "README.md").read_text()
    paths = set(re.findall(r"(deploy/(?:k8s|docker|grafana|checkov)[\w./-]*\w)", guide))
    assert {"deploy/k8s/overlays/cpu-dev", "deploy/k8s/tools/toolbox"} <= paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_volume_claim_is_mounted_through_a_subpath(rendered, overlay):
    """kubelet creates a missing subPath directory owned by root, which these non-root pods could not write."""
    for obj, spec in workloads(rendered[overlay]):
        claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        claims |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert not (m["name"] in claims and m.get("subPath")), f"{ident(obj, c)}: {m['mountPath']}"


def test_the_gpu_fine_tune_template_differs_from_the_base_one_only_in_gpu_scheduling_and_sizes(rendered):
    """gpu-prod carries its own copy of the Job template (a ConfigMap string cannot be patched): keep them in step."""
    from k8s_manifests import finetune_jobs

    def shape(job):
        spec = job["spec"]["template"]["spec"]
        spec = {k: v for k, v in spec.items() if k not in ("nodeSelector", "tolerations")}
        c = {k: v for k, v in spec["containers"][0].items() if k not in ("resources", "image")}
        c["env"] = [e for e in c["env"] if not e["name"].startswith("SOVEREIGN_FINETUNE_SERVING")]
        volumes = [{k: v for k, v in vol.items() if k != "emptyDir"} for vol in spec["volumes"]]
        return {**job, "spec": {**job["spec"], "template": {**job["spec"]["template"], "spec": {
            **spec, "containers": [c], "volumes": volumes}}}}

    dev = finetune_jobs([o for o in rendered["cpu-dev"] if o["kind"] == "ConfigMap"])
    prod = finetune_jobs([o for o in rendered["gpu-prod"] if o["kind"] == "ConfigMap"])
    assert len(dev) == len(prod) == 1
    assert shape(dev[0]) == shape(prod[0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_scaled_by_an_autoscaler_leave_replicas_to_it(rendered, overlay):
    objects = rendered[overlay]
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert "replicas" not in find(objects, ref["kind"], ref["name"])["spec"], f"{ref['name']} sets replicas"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_fine_tune_gate_points_at_a_served_model_and_its_supervisor(rendered, overlay):
    from k8s_manifests import finetune_jobs

    objects = rendered[overlay]
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    (job,) = finetune_jobs([o for o in objects if o["kind"] == "ConfigMap"])
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var, port_name in (("SOVEREIGN_FINETUNE_SERVING_URL", "http"), ("SOVEREIGN_FINETUNE_SERVING_HEALTH_URL",
                                                                         "health")):
        host, _, port = env[var].removeprefix("http://").partition(":")
        ports = {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}
        assert ports[port_name] == int(port), f"{var}={env[var]}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_fits_a_client_side_apply(rendered, overlay):
    """`kubectl apply` keeps each object in an annotation, and annotations hold at most 256 KiB per object."""
    import json

    for obj in rendered[overlay]:
        assert len(json.dumps(obj)) < 200_000, ident(obj)


def test_cpu_dev_takes_the_monitoring_component_as_its_comment_says(tmp_path):
    """Uncommenting the monitoring line of cpu-dev's `components:` (in a copy of deploy/) adds the ServiceMonitor and
    the dashboard, in the namespace."""
    import shutil

    from k8s_manifests import K8S, kustomize

    copy = tmp_path / "deploy"
    shutil.copytree(K8S.parent, copy)
    kustomization = copy / "k8s" / "overlays" / "cpu-dev" / "kustomization.yaml"
    text = kustomization.read_text()
    commented = "  # - ../../components/monitoring"
    enabled = text.replace(commented, "  - ../../components/monitoring")
    assert enabled != text, "cpu-dev no longer carries the commented monitoring component"
    kustomization.write_text(enabled)
    objects = kustomize(copy / "k8s" / "overlays" / "cpu-dev")
    assert find(objects, "ServiceMonitor", "sovereign")["metadata"]["namespace"] == NAMESPACE
    assert find(objects, "ConfigMap", "sovereign-grafana-dashboards")["metadata"]["namespace"] == NAMESPACE
