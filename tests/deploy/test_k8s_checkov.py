"""checkov (the security scanner) over the rendered overlays, the fine-tune Job template as the gateway's runner
renders it, the toolbox and the Dockerfiles: no failed check, and every skipped check is explained in
deploy/checkov.yaml."""

# The session fixtures are imported from k8s_manifests (a conftest.py here would shadow tests/conftest.py), so
# test arguments shadow those imports by design.
# ruff: noqa: F811

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from k8s_manifests import K8S, rendered, tool, toolbox  # noqa: F401 (session fixtures)

CONFIG = K8S.parent / "checkov.yaml"
DOCKER = K8S.parent / "docker"
# checkov must not phone home (guidelines download, version check): the tests run offline.
OFFLINE = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE",
           "CHECKOV_EXPERIMENTAL_IMAGE_REFERENCING": "FALSE", "LOG_LEVEL": "ERROR"}


def _checkov(directory, framework: str) -> list[dict]:
    proc = subprocess.run([str(tool("checkov")), "-d", str(directory), "--framework", framework, "--config-file",
                           str(CONFIG), "--skip-download", "-o", "json"], capture_output=True, text=True,
                          timeout=600, env=OFFLINE)
    assert proc.returncode in (0, 1), f"checkov failed to run ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert all(r["summary"]["passed"] > 0 for r in reports), "checkov checked nothing"
    return reports


def _failures(reports: list[dict]) -> list[str]:
    return [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
            for r in reports for c in r["results"]["failed_checks"]]


@pytest.fixture(scope="module")
def manifests_dir(rendered, toolbox, tmp_path_factory):
    out = tmp_path_factory.mktemp("rendered")
    for overlay, objects in rendered.items():
        (out / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    (out / "toolbox.yaml").write_text(yaml.safe_dump_all(toolbox))
    return out


def test_checkov_finds_no_failed_check_in_the_rendered_manifests(manifests_dir, rendered):
    reports = _checkov(manifests_dir, "kubernetes")
    assert not _failures(reports), "\n".join(_failures(reports))
    # The fine-tune Job of every overlay was scanned as the object the runner creates.
    scanned = {c["resource"] for r in reports for c in r["results"]["passed_checks"]}
    assert any(r.startswith("Job.sovereign.sovereign-ft-") for r in scanned), sorted(scanned)[:20]


def test_checkov_finds_no_failed_check_in_the_dockerfiles():
    reports = _checkov(DOCKER, "dockerfile")
    assert not _failures(reports), "\n".join(_failures(reports))


def test_every_dockerfile_base_image_argument_defaults_to_a_pinned_tag():
    """FROM ${ARG} hides the tag from checkov (CKV_DOCKER_7 is skipped for that): check the defaults here."""
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert {p.name for p in dockerfiles} >= {"gateway.Dockerfile", "serving.Dockerfile", "finetune.Dockerfile"}
    for path in dockerfiles:
        text = path.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            image = base
            m = re.fullmatch(r"\$\{(\w+)\}", base)
            if m:
                image = args[m.group(1)]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{path.name}: FROM {base} -> {image} is not pinned"


def test_the_gateway_image_installs_the_base_dependencies_only():
    """`pip install .` without extras: the gateway image carries no torch, transformers or vllm."""
    text = "\n".join(ln for ln in (DOCKER / "gateway.Dockerfile").read_text().splitlines()
                     if not ln.lstrip().startswith("#"))
    installs = [i.strip() for i in re.findall(r"pip install ([^\\\n&]+)", text)]
    assert installs == ["."], installs


def test_images_run_as_the_uid_the_manifests_use():
    for path in sorted(DOCKER.glob("*.Dockerfile")):
        users = re.findall(r"^USER (\S+)", path.read_text(), re.M)
        assert users and users[-1] == "10001:10001", f"{path.name} ends as {users[-1:]}"
