"""Security by default, asserted on the rendered objects: egress denied except DNS and in-namespace (plus the few
named exits), ingress from outside only to the gateway, restricted pods, probes, pinned and overridable images, GPUs in
gpu-prod only."""

# The session fixtures are imported from k8s_manifests (a conftest.py here would shadow tests/conftest.py), so
# test arguments shadow those imports by design.
# ruff: noqa: F811

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import yaml
from k8s_manifests import (  # noqa: F401 (session fixtures)
    K8S,
    LONG_RUNNING_KINDS,
    OVERLAYS,
    by_kind,
    containers,
    everything,
    find,
    finetune_jobs,
    ident,
    kustomize,
    pod_labels,
    rendered,
    toolbox,
    workloads,
)


def _all_pods(everything):
    for where, obj in everything:
        spec = None
        for o, s in workloads([obj]):
            spec = s
        if spec is not None:
            yield where, obj, spec


# --- pods and containers --------------------------------------------------------------------------------------


def test_every_pod_and_container_runs_restricted(everything):
    problems = []
    for where, obj, spec in _all_pods(everything):
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: {ident(obj)}: pod must set runAsNonRoot and seccomp RuntimeDefault")
        if not psc.get("runAsUser"):
            problems.append(f"{where}: {ident(obj)}: pod must run as a numeric non-zero uid")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: {ident(obj)}: shares a host namespace")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            checks = {
                "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
                "readOnlyRootFilesystem: true": sc.get("readOnlyRootFilesystem") is True,
                "capabilities.drop: [ALL]": sc.get("capabilities", {}).get("drop") == ["ALL"],
                "no added capabilities": not sc.get("capabilities", {}).get("add"),
                "not privileged": sc.get("privileged") is not True,
                "not uid 0": sc.get("runAsUser", psc.get("runAsUser")) != 0,
            }
            problems += [f"{where}: {ident(obj, c)}: {what}" for what, ok in checks.items() if not ok]
    assert not problems, "\n".join(problems)


def test_every_container_sets_requests_and_limits(everything):
    problems = []
    for where, obj, spec in _all_pods(everything):
        for c in containers(spec):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for what in ("cpu", "memory", "ephemeral-storage"):
                    if what not in res.get(kind, {}):
                        problems.append(f"{where}: {ident(obj, c)}: no {kind}.{what}")
    assert not problems, "\n".join(problems)


def test_every_long_running_container_has_liveness_and_readiness_probes(everything):
    problems = []
    for where, obj, spec in _all_pods(everything):
        if obj["kind"] in LONG_RUNNING_KINDS:
            for c in spec["containers"]:
                problems += [f"{where}: {ident(obj, c)}: no {p}" for p in ("livenessProbe", "readinessProbe")
                             if p not in c]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vllm_probes_use_vllm_health_and_the_supervisor_health_port(rendered, overlay):
    for d in by_kind(rendered[overlay], "Deployment"):
        if pod_labels(d)["app.kubernetes.io/component"] != "serving":
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000, "health": 8001}
        assert (c["startupProbe"]["httpGet"]["path"], c["startupProbe"]["httpGet"]["port"]) == ("/health", "http")
        assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) == ("/healthz", "health")
        assert (c["readinessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["port"]) == ("/readyz", "health")
        # Large models load for minutes: the startup probe must allow at least ten.
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        for store, claim in (("models", "sovereign-models"), ("adapters", "sovereign-adapters")):
            m = mounts[f"/var/lib/sovereign/{store}"]
            assert m["readOnly"] is True
            assert volumes[m["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert {"name": "SOVEREIGN_HOME", "value": "/var/lib/sovereign"} in c["env"]


def test_only_the_gateway_gets_a_service_account_token(everything):
    for where, obj, spec in _all_pods(everything):
        name = obj["metadata"]["name"]
        if name == "sovereign-gateway":
            assert spec["serviceAccountName"] == "sovereign-gateway"
        else:
            assert spec.get("automountServiceAccountToken") is False, f"{where}: {ident(obj)}"


def test_the_gateway_role_manages_jobs_and_nothing_cluster_wide(rendered):
    for overlay, objects in rendered.items():
        assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
        role = find(objects, "Role", "sovereign-finetune-runner")
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert resources == {"jobs", "pods", "pods/log"}
        assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])


def test_no_secret_values_are_committed(everything):
    for where, obj in everything:
        assert obj["kind"] != "Secret", f"{where}: Secrets are created out of band, never rendered from git"


# --- images ---------------------------------------------------------------------------------------------------


def _images(objects):
    for obj, spec in workloads(objects):
        for c in containers(spec):
            yield ident(obj, c), c["image"]
    for cm in by_kind(objects, "ConfigMap"):
        if "image" in cm.get("data", {}):
            yield ident(cm), cm["data"]["image"]


def test_every_image_is_pinned_to_a_version(everything):
    for where, obj in everything:
        for who, image in _images([obj]):
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{where}: {who}: {image} has no tag"
            assert tag != "latest", f"{where}: {who}: {image} uses :latest"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_images_entry_per_image_points_everything_at_an_internal_registry(overlay, tmp_path):
    """An overlay on top of `overlay` with one `images:` entry per image name moves every image, the fine-tune Job
    template's included, to registry.corp.example."""
    objects = kustomize(K8S / "overlays" / overlay)
    names = sorted({image.rpartition(":")[0] for _, image in _images(objects)})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / overlay, mirror)],
        "images": [{"name": n, "newName": f"registry.corp.example/{n.split('/')[-1]}", "newTag": "9.9.9"}
                   for n in names],
    }))
    mirrored = kustomize(mirror)
    images = list(_images(mirrored))
    assert len(images) == len(list(_images(objects)))
    for who, image in images:
        assert image.startswith("registry.corp.example/") and image.endswith(":9.9.9"), f"{who}: {image}"
    for job in finetune_jobs(mirrored):
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.corp.example/finetune:9.9.9"


# --- GPUs -----------------------------------------------------------------------------------------------------


def test_gpu_resources_appear_in_gpu_prod_only(rendered, toolbox):
    for overlay, objects in rendered.items():
        text = yaml.safe_dump_all(objects)
        if overlay == "gpu-prod":
            continue
        assert "nvidia.com" not in text, f"{overlay} mentions GPUs"
    assert "nvidia.com" not in yaml.safe_dump_all(toolbox)


def test_gpu_prod_schedules_vllm_and_finetune_on_gpu_nodes(rendered):
    objects = rendered["gpu-prod"]
    gpu_pods = [(o, s) for o, s in workloads(objects)
                if pod_labels(o)["app.kubernetes.io/component"] in ("serving", "finetune")]
    assert {pod_labels(o)["app.kubernetes.io/component"] for o, _ in gpu_pods} == {"serving", "finetune"}
    for obj, spec in gpu_pods:
        res = spec["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1", ident(obj)
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, ident(obj)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    for obj, spec in workloads(objects):
        if pod_labels(obj)["app.kubernetes.io/component"] == "gateway":
            assert "nodeSelector" not in spec and "nvidia.com/gpu" not in str(spec["containers"][0]["resources"])


# --- network --------------------------------------------------------------------------------------------------


def _policies(objects):
    return by_kind(objects, "NetworkPolicy")


def _applies_to(policy, labels) -> bool:
    sel = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
        return False
    for expr in sel.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_all_ingress_and_egress_is_denied_by_default(rendered, overlay):
    deny = [p for p in _policies(rendered[overlay])
            if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny policy over every pod"


def _private(cidr: str) -> bool:
    net = ipaddress.ip_network(cidr)
    return net.is_private and net.prefixlen >= 16


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_leaves_the_namespace_only_for_dns_and_named_private_addresses(rendered, overlay):
    """Every egress rule names its peers: cluster DNS, pods of this namespace, or a private address block (the
    API server, the external databases) on named ports. No rule opens egress to everything."""
    for p in _policies(rendered[overlay]):
        for rule in p["spec"].get("egress", []):
            assert rule.get("to"), f"{ident(p)}: an egress rule without `to` admits every destination"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert _private(peer["ipBlock"]["cidr"]), f"{ident(p)}: {peer['ipBlock']['cidr']} is not private"
                    assert rule.get("ports"), f"{ident(p)}: an ipBlock egress must name its ports"
                elif "namespaceSelector" in peer:
                    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                    assert peer["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
                    assert {pt["port"] for pt in rule["ports"]} == {53}, ident(p)
                else:
                    assert set(peer) == {"podSelector"}, f"{ident(p)}: unexpected egress peer {peer}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_from_outside_the_namespace_reaches_the_gateway_only(rendered, overlay):
    """Only the gateway admits traffic from anywhere; other pods admit named pods of this namespace (and
    Prometheus from the monitoring namespace on the metrics ports)."""
    objects = rendered[overlay]
    policies = _policies(objects)
    open_to_all = set()
    for obj, spec in workloads(objects):
        labels = pod_labels(obj)
        for p in policies:
            if not _applies_to(p, labels):
                continue
            for rule in p["spec"].get("ingress", []):
                peers = rule.get("from")
                if not peers:
                    open_to_all.add(labels["app.kubernetes.io/component"])
                    assert [pt["port"] for pt in rule["ports"]] == [8080], ident(p)
                    continue
                for peer in peers:
                    if "namespaceSelector" in peer:
                        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name":
                                                                             "monitoring"}}, ident(p)
                        assert {pt["port"] for pt in rule["ports"]} <= {8000, 8080}, ident(p)
                    else:
                        assert set(peer) == {"podSelector"} and peer["podSelector"], f"{ident(p)}: {peer}"
    assert open_to_all == {"gateway"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_datastores_and_vllm_admit_only_their_clients(rendered, overlay):
    objects = rendered[overlay]
    want = {"serving": {"gateway", "finetune"}, "postgres": {"gateway", "audit-retention"}, "redis": {"gateway"}}
    for obj, _ in workloads(objects):
        component = pod_labels(obj)["app.kubernetes.io/component"]
        if component not in want:
            continue
        clients = set()
        for p in _policies(objects):
            if _applies_to(p, pod_labels(obj)):
                for rule in p["spec"].get("ingress", []):
                    for peer in rule.get("from", []):
                        clients |= {v for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items()
                                    if k == "app.kubernetes.io/component"}
        assert clients == want[component], f"{ident(obj)} admits {clients}"


def test_the_checkov_skip_list_explains_every_skip():
    """Each check skipped in deploy/checkov.yaml carries a `# CKV_...: why` line."""
    path = Path(K8S.parent / "checkov.yaml")
    skipped = yaml.safe_load(path.read_text())["skip-check"]
    explained = {line.split(":")[0].strip("# ").strip() for line in path.read_text().splitlines()
                 if line.lstrip().startswith("# CKV")}
    assert skipped and set(skipped) <= explained, set(skipped) - explained
