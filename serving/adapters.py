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

from serving.errors import AdapterNotFound, AdapterRefused, ServingError
from sovereign.formats import ADAPTER_MANIFEST, AdapterManifest, ModelManifest, digest_files, version_order

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: `$` would let a trailing "\n" in
_REMOVING = ".removing-"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What vLLM 0.32 requires of and refuses in adapter_config.json (vllm/lora/peft_helper.py).
_VLLM_REQUIRED = ("r", "lora_alpha", "target_modules")
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # init_lora_weights strings that leave base alone
_VLLM_UNSUPPORTED = {
    "lora_bias": "LoRA bias",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}


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


_PREDATES_CONTENT_HASH = ("; published before adapters recorded the base's content hash, so even the same weights "
                          "imported again count as another copy: publish it again if they are the same")


def servability_problems(folder: Path, manifest: AdapterManifest, base: ModelManifest,
                         max_lora_rank: int | None) -> list[str]:
    """Why vLLM cannot serve this adapter on this base model with this profile; empty when it can.

    Mirrors vLLM 0.32's own check (vllm/lora/peft_helper.py, PEFTHelper.validate_legal) so an adapter is refused
    here, with its reason, rather than by the running server. `max_lora_rank=None` skips only the rank limit.
    """
    problems = []
    try:
        peft = read_peft_config(folder)
    except AdapterRefused as exc:
        return [str(exc)]
    if str(peft.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {peft.get('peft_type')!r} is not LORA")
    missing = [k for k in _VLLM_REQUIRED if k not in peft]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)} (vLLM requires them)")
    problems += _rank_problems(peft.get("r", manifest.rank), peft.get("rank_pattern"), max_lora_rank)
    if peft.get("bias", "none") != "none":
        problems.append(f"bias {peft.get('bias')!r} is not supported by vLLM (only 'none')")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _VLLM_INITS:
        problems.append(f"init_lora_weights {init!r} is not supported by vLLM: it changes the base weights; "
                        f"convert the adapter to a plain LoRA (peft's path_initial_model_for_weight_conversion)")
    for key, what in _VLLM_UNSUPPORTED.items():
        if peft.get(key):
            problems.append(f"{key} {peft[key]!r}: {what} is not supported by vLLM")
    if peft.get("use_dora") or manifest.use_dora:
        problems.append("DoRA adapters (use_dora: true) are not supported by vLLM")
    if peft.get("modules_to_save") or manifest.modules_to_save:
        problems.append(f"modules_to_save {peft.get('modules_to_save') or manifest.modules_to_save} is not "
                        f"supported by vLLM; train without it")
    if manifest.base_model != base.name:
        problems.append(f"trained for base model {manifest.base_model!r}, not {base.name!r}")
    elif (manifest.base_manifest_sha256 != base.canonical_sha256()
          and manifest.base_content_sha256 != base.content_sha256()):
        problems.append(f"trained on a different copy of {base.name!r} (base manifest hash "
                        f"{manifest.base_manifest_sha256[:12]}…, store has {base.canonical_sha256()[:12]}…)"
                        + ("" if manifest.base_content_sha256 else _PREDATES_CONTENT_HASH))
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
        return max(matches, key=lambda a: version_order(a.manifest.version))

    def next_version(self, name: str) -> str:
        # After every numbered version, vN or bare N alike, so the new one is the newest by version_order.
        keys = [version_order(a.manifest.version) for a in self.list() if a.manifest.name == name]
        return f"v{max((int(n) for numbered, n in keys if numbered), default=0) + 1}"

    def publish(self, source: Path, name: str, base: ModelManifest, *, version: str | None = None,
                max_lora_rank: int | None = None, origin: dict | None = None, metrics: dict | None = None,
                lineage: dict | None = None) -> RegisteredAdapter:
        """Copy a peft adapter folder into the registry with its manifest; refuse what vLLM could not serve."""
        if not _NAME.fullmatch(name):
            raise AdapterRefused(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        version = version or self.next_version(name)
        if not _NAME.fullmatch(version):
            raise AdapterRefused(f"invalid adapter version {version!r}")
        target = self.root / name / version
        if target.exists():
            raise AdapterRefused(f"adapter {name}@{version} is already published; publish a new version")
        peft = read_peft_config(source)
        manifest = AdapterManifest(
            name=name, version=version, base_model=base.name, base_manifest_sha256=base.canonical_sha256(),
            base_content_sha256=base.content_sha256(), rank=peft["r"] if _positive_int(peft.get("r")) else 0,
            alpha=peft.get("lora_alpha"),
            target_modules=_as_list(peft.get("target_modules")), use_dora=bool(peft.get("use_dora")),
            modules_to_save=peft.get("modules_to_save") or None,
            origin=origin or {"kind": "path", "source": str(source.resolve())},
            metrics=metrics or {}, lineage=lineage or {},
        )
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
        _sweep_removed(self.root)
        for a in victims:
            # Rename first so a watcher stops seeing it at once, then delete. The hidden name is unique: a remove
            # killed before its delete leaves one behind, which must not block removing a later same version.
            try:
                doomed = Path(tempfile.mkdtemp(dir=a.path.parent, prefix=f"{_REMOVING}{a.path.name}-"))
                a.path.rename(doomed / a.path.name)
            except OSError as exc:
                raise ServingError(f"could not remove adapter {a.served_name} at {a.path}: {exc}",
                                   code="adapter_remove_failed") from exc
            shutil.rmtree(doomed, ignore_errors=True)
        return [a.served_name for a in victims]


def _sweep_removed(root: Path) -> None:
    """Delete what removes killed before their delete left behind."""
    for leftover in root.glob(f"*/{_REMOVING}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _rank_problems(r: Any, rank_pattern: Any, max_lora_rank: int | None) -> list[str]:
    """vLLM loads every module at the largest of `r` and the `rank_pattern` ranks; each must be a positive int."""
    problems, ranks = [], []
    if _positive_int(r):
        ranks.append((r, ""))
    else:
        problems.append(f"r = {r!r}: the LoRA rank must be a positive integer")
    if not isinstance(rank_pattern, dict):
        if rank_pattern is not None:
            problems.append(f"rank_pattern {rank_pattern!r} is not a mapping of module pattern to rank")
        rank_pattern = {}
    for key, rank in rank_pattern.items():
        if _positive_int(rank):
            ranks.append((rank, f" in rank_pattern {{{key!r}: {rank}}}"))
        else:
            problems.append(f"rank_pattern {{{key!r}: {rank!r}}}: the LoRA rank must be a positive integer")
    if ranks and max_lora_rank is not None:
        top, where = max(ranks, key=lambda x: x[0])
        if top > max_lora_rank:
            problems.append(f"rank {top}{where} exceeds the serving profile's max_lora_rank {max_lora_rank}")
    return problems


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else sorted(v)
