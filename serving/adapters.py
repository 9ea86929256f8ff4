"""The LoRA adapter registry on disk and the checks that keep vLLM from being handed an adapter it cannot serve.

`adapters/<name>/<version>/` holds the peft files and `adapter.json` (sovereign.formats.AdapterManifest). Publishing
copies into a hidden temp folder and renames it into place, so a watcher never sees half an adapter.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import AdapterNotFound, AdapterRefused
from sovereign.formats import ADAPTER_MANIFEST, AdapterManifest, ModelManifest, digest_files

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class RegisteredAdapter:
    path: Path
    manifest: AdapterManifest

    @property
    def served_name(self) -> str:
        return self.manifest.served_name


def read_peft_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "adapter_config.json"
    if not cfg.is_file():
        raise AdapterRefused(f"{folder}: no adapter_config.json (not a peft adapter folder)")
    return json.loads(cfg.read_text(encoding="utf-8"))


def servability_problems(folder: Path, manifest: AdapterManifest, base: ModelManifest, max_lora_rank: int) -> list[str]:
    """Why vLLM cannot serve this adapter on this base model with this profile; empty when it can."""
    problems = []
    try:
        peft = read_peft_config(folder)
    except AdapterRefused as exc:
        return [str(exc)]
    if str(peft.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {peft.get('peft_type')!r} is not LORA")
    rank = int(peft.get("r", manifest.rank))
    if rank > max_lora_rank:
        problems.append(f"rank {rank} exceeds the serving profile's max_lora_rank {max_lora_rank}")
    if peft.get("use_dora") or manifest.use_dora:
        problems.append("DoRA adapters (use_dora: true) are not supported by vLLM")
    if peft.get("modules_to_save") or manifest.modules_to_save:
        problems.append(f"modules_to_save {peft.get('modules_to_save') or manifest.modules_to_save} is not "
                        f"supported by vLLM; train without it")
    if manifest.base_model != base.name:
        problems.append(f"trained for base model {manifest.base_model!r}, not {base.name!r}")
    elif manifest.base_manifest_sha256 != base.canonical_sha256():
        problems.append(f"trained on a different copy of {base.name!r} (base manifest hash "
                        f"{manifest.base_manifest_sha256[:12]}…, store has {base.canonical_sha256()[:12]}…)")
    if not any((folder / w).is_file() for w in _WEIGHTS):
        problems.append(f"no adapter weights ({' or '.join(_WEIGHTS)})")
    return problems


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self, base_model: str | None = None) -> list[RegisteredAdapter]:
        if not self.root.is_dir():
            return []
        out = []
        for manifest_path in sorted(self.root.glob(f"*/*/{ADAPTER_MANIFEST}")):
            if any(part.startswith(".") for part in manifest_path.relative_to(self.root).parts):
                continue
            try:
                manifest = AdapterManifest.read(manifest_path)
            except (ValueError, OSError):
                continue  # unreadable manifests are reported by `sovereign adapters list`, not served
            if base_model is None or manifest.base_model == base_model:
                out.append(RegisteredAdapter(manifest_path.parent, manifest))
        return out

    def get(self, name: str, version: str | None = None) -> RegisteredAdapter:
        matches = [a for a in self.list() if a.manifest.name == name and version in (None, a.manifest.version)]
        if not matches:
            raise AdapterNotFound(f"no adapter {name}{'@' + version if version else ''} in {self.root}")
        return max(matches, key=lambda a: _version_key(a.manifest.version))

    def next_version(self, name: str) -> str:
        versions = [a.manifest.version for a in self.list() if a.manifest.name == name]
        nums = [int(v[1:]) for v in versions if re.fullmatch(r"v\d+", v)]
        return f"v{max(nums, default=0) + 1}"

    def publish(self, source: Path, name: str, base: ModelManifest, *, version: str | None = None,
                max_lora_rank: int | None = None, origin: dict | None = None, metrics: dict | None = None,
                lineage: dict | None = None) -> RegisteredAdapter:
        """Copy a peft adapter folder into the registry with its manifest; refuse what vLLM could not serve."""
        if not _NAME.match(name):
            raise AdapterRefused(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        version = version or self.next_version(name)
        if not _NAME.match(version):
            raise AdapterRefused(f"invalid adapter version {version!r}")
        target = self.root / name / version
        if target.exists():
            raise AdapterRefused(f"adapter {name}@{version} is already published; publish a new version")
        peft = read_peft_config(source)
        manifest = AdapterManifest(
            name=name, version=version, base_model=base.name, base_manifest_sha256=base.canonical_sha256(),
            rank=int(peft.get("r", 0)), alpha=peft.get("lora_alpha"),
            target_modules=_as_list(peft.get("target_modules")), use_dora=bool(peft.get("use_dora")),
            modules_to_save=peft.get("modules_to_save") or None,
            origin=origin or {"kind": "path", "source": str(source.resolve())},
            metrics=metrics or {}, lineage=lineage or {},
        )
        if max_lora_rank is not None:
            problems = servability_problems(source, manifest, base, max_lora_rank)
            if problems:
                raise AdapterRefused(f"adapter {name}@{version} refused: " + "; ".join(problems))
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=f".publish-{version}-"))
        try:
            for f in sorted(source.iterdir()):
                if f.is_file() and f.name != ADAPTER_MANIFEST:
                    shutil.copy2(f, tmp / f.name)
            manifest.files = digest_files(tmp)
            manifest.write(tmp / ADAPTER_MANIFEST)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return RegisteredAdapter(target, manifest)

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Remove one version (or every version) of an adapter; returns the served names removed."""
        victims = [a for a in self.list() if a.manifest.name == name and version in (None, a.manifest.version)]
        if not victims:
            raise AdapterNotFound(f"no adapter {name}{'@' + version if version else ''} in {self.root}")
        for a in victims:
            # Rename first so a watcher stops seeing it at once, then delete.
            doomed = a.path.with_name(f".removing-{a.path.name}")
            a.path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return [a.served_name for a in victims]


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else sorted(v)


def _version_key(v: str) -> tuple[int, str]:
    return (int(v[1:]), v) if re.fullmatch(r"v\d+", v) else (-1, v)
