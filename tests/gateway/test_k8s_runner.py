"""The `kubernetes` runner mode: the Job rendered from the template the k8s manifests ship (deploy/k8s/base/finetune),
and the API-server calls it makes, checked at the transport seam (httpx.MockTransport); no cluster needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.finetune_config import FineTuningConfig, KubernetesRunnerConfig
from gateway.job_runner import JobRunner
from gateway.job_store import JobStore, new_job_id
from gateway.k8s_runner import KubernetesLauncher, render_job
from sovereign.errors import ConfigError
from sovereign.formats import JobRecord

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "k8s" / "base" / "finetune"

TEMPLATE = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: sovereign-ft-${JOB_ID}
  labels:
    sovereign.io/job-id: ${JOB_ID}
spec:
  backoffLimit: 3
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: finetune
          image: ${IMAGE}
          command: ["sovereign"]
          args: ["finetune", "run-job", "/var/lib/sovereign/jobs/${JOB_ID}"]
          env:
            - name: SOVEREIGN_HOME
              value: /var/lib/sovereign
            - name: SOVEREIGN_FINETUNE_SERVING_URL
              value: http://vllm-default:8000
"""


def template_dir(tmp_path: Path, text: str = TEMPLATE, image: str = "registry.corp/sovereign/finetune:1\n") -> Path:
    d = tmp_path / "template"
    d.mkdir(exist_ok=True)
    (d / "job.yaml").write_text(text)
    (d / "image").write_text(image)
    return d


def service_account(tmp_path: Path) -> Path:
    d = tmp_path / "sa"
    d.mkdir()
    (d / "token").write_text("sa-token-123\n")
    (d / "namespace").write_text("sovereign\n")
    return d


def test_render_substitutes_the_job_id_and_image_and_sets_per_model_env():
    job_id = new_job_id()
    job = render_job(TEMPLATE, job_id=job_id, image="img:1",
                     env={"SOVEREIGN_FINETUNE_SERVING_URL": "http://vllm-qwen:8000", "EXTRA": "1"})
    assert job["metadata"]["name"] == f"sovereign-ft-{job_id}"
    assert job["metadata"]["labels"]["sovereign.io/job-id"] == job_id
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "img:1"
    assert c["args"] == ["finetune", "run-job", f"/var/lib/sovereign/jobs/{job_id}"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"SOVEREIGN_HOME": "/var/lib/sovereign", "SOVEREIGN_FINETUNE_SERVING_URL": "http://vllm-qwen:8000",
                   "EXTRA": "1"}
    assert [e["name"] for e in c["env"]].count("SOVEREIGN_FINETUNE_SERVING_URL") == 1


def test_render_refuses_templates_it_cannot_fill():
    with pytest.raises(ConfigError) as exc:
        render_job(TEMPLATE + "          workingDir: ${WORKDIR}\n", job_id="ftjob-1", image="i")
    assert exc.value.code == "job_template_invalid" and "WORKDIR" in exc.value.message
    with pytest.raises(ConfigError):
        render_job("kind: Deployment\napiVersion: apps/v1\n", job_id="ftjob-1", image="i")


@pytest.mark.skipif(not (SHIPPED / "job.yaml").is_file(), reason="deploy/k8s (the k8s room) is not merged yet")
def test_the_shipped_template_renders_to_a_job_running_run_job_on_the_jobs_volume(tmp_path):
    kustomization = yaml.safe_load((SHIPPED / "kustomization.yaml").read_text())
    image = next(lit.split("=", 1)[1] for lit in kustomization["configMapGenerator"][0]["literals"]
                 if lit.startswith("image="))
    job_id = new_job_id()
    launcher = KubernetesLauncher(KubernetesRunnerConfig(template_dir=template_dir(
        tmp_path, (SHIPPED / "job.yaml").read_text(), image), namespace="ns"))
    job = launcher.render(JobRecord(id=job_id, model="SmolLM2-135M-Instruct", training_file="file-x"))
    assert job["kind"] == "Job" and job["metadata"]["name"] == f"sovereign-ft-{job_id}"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == image
    assert [*c["command"], *c["args"]][-3:] == ["finetune", "run-job", f"/var/lib/sovereign/jobs/{job_id}"]
    assert "${" not in json.dumps(job)


class FakeApiServer:
    """What the API server answers, recorded per request (the transport seam)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.jobs: dict[str, dict] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        prefix = "/apis/batch/v1/namespaces/sovereign/jobs"
        assert request.headers["authorization"] == "Bearer sa-token-123"
        if request.method == "POST" and request.url.path == prefix:
            job = json.loads(request.content)
            name = job["metadata"]["name"]
            if name in self.jobs:
                return httpx.Response(409, json={"message": "already exists"})
            job["metadata"]["uid"] = "uid-1"
            job["status"] = {}
            self.jobs[name] = job
            return httpx.Response(201, json=job)
        name = request.url.path.removeprefix(prefix + "/")
        if name not in self.jobs:
            return httpx.Response(404, json={"message": "not found"})
        if request.method == "GET":
            return httpx.Response(200, json=self.jobs[name])
        if request.method == "DELETE":
            self.jobs.pop(name)
            return httpx.Response(200, json={"status": "Success"})
        return httpx.Response(405)


def test_runner_submits_watches_and_cancels_kubernetes_jobs(tmp_path):
    api = FakeApiServer()
    k8s = KubernetesRunnerConfig(template_dir=template_dir(tmp_path), service_account_dir=service_account(tmp_path),
                                 api_url="https://kubernetes.default.svc",
                                 env_by_model={"base": {"SOVEREIGN_FINETUNE_SERVING_URL": "http://vllm-base:8000"}})
    launcher = KubernetesLauncher(k8s, transport=httpx.MockTransport(api))
    store = JobStore(tmp_path / "jobs")
    runner = JobRunner(FineTuningConfig(runner="kubernetes", max_concurrent_jobs=1, kubernetes=k8s), store, launcher)
    records = []
    for _ in range(2):
        r = JobRecord(id=new_job_id(), status="queued", model="base", training_file="file-x", owner="a",
                      runner="kubernetes")
        store.job_dir(r.id).mkdir(parents=True)
        store.write(r)
        records.append(r)
    first, second = sorted(records, key=lambda r: (r.created_at, r.id))

    runner.scan()
    assert list(api.jobs) == [f"sovereign-ft-{first.id}"]  # one slot: the second waits
    sent = api.jobs[f"sovereign-ft-{first.id}"]
    env = {e["name"]: e["value"] for e in sent["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SOVEREIGN_FINETUNE_SERVING_URL"] == "http://vllm-base:8000"
    claim = json.loads((store.job_dir(first.id) / "worker.json").read_text())
    assert claim["job"] == f"sovereign-ft-{first.id}" and claim["namespace"] == "sovereign"

    # The pod ran out of retries before run-job could record anything: the job fails with the Job's reason.
    api.jobs[f"sovereign-ft-{first.id}"]["status"] = {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}
    runner.scan()
    failed = store.read(first.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_died"
    assert "BackoffLimitExceeded" in failed.error["message"] and "kubectl logs" in failed.error["message"]
    assert f"sovereign-ft-{second.id}" in api.jobs  # the slot went to the next job in the same round

    assert runner.cancel(second.id).status == "cancelled"
    delete = api.requests[-1]
    assert delete.method == "DELETE" and json.loads(delete.content)["propagationPolicy"] == "Background"
    runner.scan()
    assert store.read(second.id).status == "cancelled"
