"""`FineTuningConfig`: the `fine_tuning:` section of the gateway config (uploads, the job runner and its limits).

Jobs run as a detached local process (`sovereign finetune run-job JOB_DIR`) on one machine, or as a Kubernetes Job
rendered from the template the k8s manifests mount into the gateway (deploy/k8s/base/finetune).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KubernetesRunnerConfig(BaseModel):
    """Where the Job template is and how to reach the API server from inside the cluster."""

    model_config = ConfigDict(extra="forbid")

    # The ConfigMap `sovereign-finetune-job` mounted here: `job.yaml` (${JOB_ID}, ${IMAGE}) and `image`.
    template_dir: Path = Path("/etc/sovereign/finetune")
    api_url: str = "https://kubernetes.default.svc"
    # None: the namespace of the gateway's own service account.
    namespace: str | None = None
    service_account_dir: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    # Per base model, container env to set in the Job (e.g. SOVEREIGN_FINETUNE_SERVING_URL of that model's vLLM).
    env_by_model: dict[str, dict[str, str]] = Field(default_factory=dict)
    request_timeout_s: float = Field(10.0, gt=0)


class FineTuningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runner: Literal["local", "kubernetes"] = "local"
    # Jobs running at once; more wait in `queued`.
    max_concurrent_jobs: int = Field(1, ge=1)
    # Largest upload accepted by POST /v1/files.
    max_file_bytes: int = Field(512 * 1024 * 1024, gt=0)
    # The worker command; JOB_DIR is appended. None: `<this python> -m sovereign.cli finetune run-job`.
    worker_command: list[str] | None = None
    # Extra environment for local workers (on top of the offline environment and SOVEREIGN_HOME).
    worker_env: dict[str, str] = Field(default_factory=dict)
    # The fine-tune preset (configs/finetune/<name>.yaml) jobs are built on; None: the worker's default.
    preset: str | None = None
    # How often the runner looks at job records and workers.
    poll_interval_s: float = Field(1.0, gt=0)
    # How long a succeeded job waits for some replica to list its adapter before the client is told it succeeded.
    discover_timeout_s: float = Field(30.0, ge=0)
    kubernetes: KubernetesRunnerConfig = Field(default_factory=KubernetesRunnerConfig)
