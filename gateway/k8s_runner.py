"""Fine-tune jobs as Kubernetes Jobs: render the template the k8s manifests mount into the gateway, submit it.

The ConfigMap `sovereign-finetune-job` (deploy/k8s/base/finetune) is mounted at `template_dir`: `job.yaml`, a
batch/v1 Job with `${JOB_ID}` and `${IMAGE}` placeholders (string.Template), and `image`. The runner talks to the
API server over plain HTTPS with the pod's service-account token (Role `sovereign-finetune-runner`), which keeps the
heavy `kubernetes` client out of the gateway image. The Job runs `sovereign finetune run-job` on the shared jobs
volume, where the gateway wrote job.json first.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.finetune_config import KubernetesRunnerConfig
from gateway.job_runner import WorkerState
from sovereign.errors import ConfigError
from sovereign.formats import JobRecord


def render_job(template: str, *, job_id: str, image: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Job object for `job_id`: placeholders substituted, `env` set on every container (replacing same names)."""
    try:
        text = string.Template(template).substitute(JOB_ID=job_id, IMAGE=image)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"fine-tune Job template: unknown or malformed placeholder {exc}; only ${{JOB_ID}} and "
                          f"${{IMAGE}} are substituted", code="job_template_invalid") from None
    job = yaml.safe_load(text)
    if not isinstance(job, dict) or job.get("kind") != "Job" or not str(job.get("apiVersion", "")).startswith(
            "batch/"):
        raise ConfigError("fine-tune Job template: expected a batch/v1 Job", code="job_template_invalid")
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        raise ConfigError("fine-tune Job template: the Job has no containers", code="job_template_invalid")
    for container in containers:
        current = [e for e in container.get("env") or [] if e.get("name") not in (env or {})]
        container["env"] = current + [{"name": k, "value": v} for k, v in (env or {}).items()]
    return job


def job_name(job: dict[str, Any]) -> str:
    return job["metadata"]["name"]


class KubernetesLauncher:
    def __init__(self, config: KubernetesRunnerConfig, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._client: httpx.Client | None = None
        self._namespace = config.namespace

    # the API server ----------------------------------------------------------------------------------------
    def _sa(self, name: str) -> str:
        return (self.config.service_account_dir / name).read_text(encoding="utf-8").strip()

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = self._sa("namespace")
        return self._namespace

    def client(self) -> httpx.Client:
        if self._client is None:
            ca = self.config.service_account_dir / "ca.crt"
            verify: Any = str(ca) if ca.is_file() else True
            self._client = httpx.Client(base_url=self.config.api_url, transport=self._transport, verify=verify,
                                        timeout=self.config.request_timeout_s, trust_env=False)
        return self._client

    def _headers(self) -> dict[str, str]:
        # Read each time: the kubelet rotates projected service-account tokens.
        return {"Authorization": f"Bearer {self._sa('token')}", "Accept": "application/json"}

    def _jobs_path(self) -> str:
        return f"/apis/batch/v1/namespaces/{self.namespace}/jobs"

    # the template ------------------------------------------------------------------------------------------
    def render(self, record: JobRecord) -> dict[str, Any]:
        d: Path = self.config.template_dir
        try:
            template = (d / "job.yaml").read_text(encoding="utf-8")
            image = (d / "image").read_text(encoding="utf-8").strip()
        except FileNotFoundError as exc:
            raise ConfigError(f"fine-tune Job template not found: {exc.filename}; mount the ConfigMap "
                              f"sovereign-finetune-job there or set fine_tuning.kubernetes.template_dir",
                              code="job_template_missing") from None
        return render_job(template, job_id=record.id, image=image, env=self.config.env_by_model.get(record.model))

    # Launcher ----------------------------------------------------------------------------------------------
    def launch(self, record: JobRecord, job_dir: Path) -> dict[str, Any]:
        job = self.render(record)
        r = self.client().post(self._jobs_path(), json=job, headers=self._headers())
        if r.status_code == 409:  # created before (a gateway restarted mid-launch): it is ours
            return {"runner": "kubernetes", "namespace": self.namespace, "job": job_name(job)}
        if r.status_code >= 300:
            raise RuntimeError(f"the Kubernetes API refused the Job ({r.status_code}): {_reason(r)}")
        return {"runner": "kubernetes", "namespace": self.namespace, "job": job_name(job),
                "uid": r.json().get("metadata", {}).get("uid")}

    def state(self, record: JobRecord, job_dir: Path, claim: dict[str, Any]) -> WorkerState:
        name = claim.get("job")
        if not name:
            return WorkerState(False, "the Kubernetes Job was never created (the gateway stopped while creating it)")
        try:
            r = self.client().get(f"{self._jobs_path()}/{name}", headers=self._headers())
        except httpx.HTTPError:
            return WorkerState(True)  # the API server is away; the Job is not known to be gone
        if r.status_code == 404:
            return WorkerState(False, f"the Kubernetes Job {name} no longer exists (deleted, or expired by its TTL)")
        if r.status_code >= 300:
            return WorkerState(True)
        status = r.json().get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("status") == "True" and cond.get("type") in ("Failed", "Complete"):
                how = "failed" if cond["type"] == "Failed" else "completed without finishing the job record"
                why = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
                return WorkerState(False, f"the Kubernetes Job {name} {how}" + (f" ({why})" if why else "")
                                   + f"; see `kubectl logs job/{name}`")
        return WorkerState(True)

    def stop(self, record: JobRecord, job_dir: Path, claim: dict[str, Any], *, force: bool = False) -> None:
        name = claim.get("job")
        if not name:
            return
        # Background propagation deletes the pod too; its container gets SIGTERM and the grace period.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if force:
            body["gracePeriodSeconds"] = 0
        self.client().request("DELETE", f"{self._jobs_path()}/{name}", json=body, headers=self._headers())

    def reap(self) -> None:
        """Nothing to collect: the Job's pods are the cluster's, and its TTL removes them."""


def _reason(r: httpx.Response) -> str:
    try:
        return str(r.json().get("message") or r.text)[:300]
    except ValueError:
        return r.text[:300]
