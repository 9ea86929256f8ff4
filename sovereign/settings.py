"""Where the platform keeps its state, and how a YAML file in configs/ becomes a validated pydantic model.

Precedence, highest first: explicit keyword arguments, environment variables (each model names its prefix),
the YAML file, the model's defaults. Invalid configuration fails at load time naming the file and the field.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sovereign.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"

_yaml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_yaml_data", default={})


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


class YamlSettings(BaseSettings):
    """A settings model that can be loaded from YAML with `load(path)`; env vars override the file."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @classmethod
    def load(cls: type[_S], path: str | Path | None = None, **overrides: Any) -> _S:
        """Read `path` (YAML), apply env overrides, validate; a bad file raises ConfigError naming file and field."""
        data: dict[str, Any] = {}
        where = str(path) if path is not None else f"<{cls.__name__} defaults>"
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise ConfigError(f"{where}: no such configuration file", code="config_not_found") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        token = _yaml_data.set(data)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None
        finally:
            _yaml_data.reset(token)


_S = TypeVar("_S", bound=YamlSettings)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: message (got value)`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


class HomeSettings(BaseSettings):
    """The state directory: model store, adapter registry, job records, gateway database."""

    model_config = SettingsConfigDict(env_prefix="SOVEREIGN_", extra="ignore")

    home: Path = Path.home() / ".sovereign"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


def config_path(kind: str, name_or_path: str | Path) -> Path:
    """`cpu` -> configs/serving/cpu.yaml; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return REPO_CONFIGS / kind / f"{name_or_path}.yaml"
