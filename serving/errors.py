"""The serving room's error type: every refusal carries a stable code and says what to fix."""

from __future__ import annotations

from sovereign.errors import SovereignError


class ServingError(SovereignError):
    code = "serving_error"


class ModelNotFound(ServingError):
    code = "model_not_found"


class ModelExists(ServingError):
    code = "model_exists"


class ModelInUse(ServingError):
    code = "model_in_use"


class ModelTampered(ServingError):
    """A file in the model folder no longer matches the manifest; serving refuses the model."""

    code = "model_tampered"


class ImportFailed(ServingError):
    code = "model_import_failed"


class AdapterRefused(ServingError):
    """vLLM cannot serve this adapter (rank, DoRA, modules_to_save, other base model, missing files)."""

    code = "adapter_refused"


class AdapterNotFound(ServingError):
    code = "adapter_not_found"
