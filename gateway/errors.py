"""The gateway's one error type and its one mapping to OpenAI error objects.

Every refusal the gateway makes is a `GatewayError`; `body()` is the JSON the client sees and `status` its HTTP
status, so the `openai` SDK raises the matching exception class (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import ast
import math
import re

import orjson

from sovereign.errors import SovereignError


class GatewayError(SovereignError):
    code = "gateway_error"

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code or type)
        self.status = status
        self.type = type
        self.param = param
        self.headers = headers or {}
        self.openai_code = code

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.openai_code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def content_policy(message: str) -> GatewayError:
    return GatewayError(400, message, code="content_policy_violation")


def invalid_api_key(message: str = "Incorrect or missing API key. Send `Authorization: Bearer <key>`.") -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def model_not_allowed(model: str, team: str, owner: str | None = None) -> GatewayError:
    if owner is not None:
        message = (f"The model `{model}` is a fine-tuned adapter of team `{owner}`; team `{team}` may call it only once "
                   f"an admin names it in the team's allowed models (the catch-all `*` does not cover it).")
    else:
        message = (f"The model `{model}` is not allowed for team `{team}`; ask an admin to add it to the team's allowed "
                   f"models.")
    return GatewayError(403, message, type="permission_error", code="model_not_allowed", param="model")


def model_withdrawn(model: str) -> GatewayError:
    message = (f"The model `{model}` is the adapter of a fine-tune job that did not succeed: it is withdrawn and no "
               f"key may call it (an operator removes it with `sovereign adapters remove {model}`).")
    return GatewayError(403, message, type="permission_error", code="model_not_allowed", param="model")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model `{model}` does not exist or is not served right now; GET /v1/models lists "
                             f"what your key may use.", code="model_not_found", param="model")


def admin_required() -> GatewayError:
    return GatewayError(403, "This endpoint needs an admin key.", type="permission_error", code="admin_required")


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than the gateway's limit of {limit} bytes.",
                        code="request_too_large")


def overloaded(message: str, retry_after_s: float = 1.0) -> GatewayError:
    # Without Retry-After the SDK retries a 503 after 0.5 s and 1 s, long before a replica can be healthy again.
    seconds = max(1, math.ceil(retry_after_s))
    return GatewayError(503, message, type="server_error", code="overloaded",
                        headers={"retry-after": str(seconds), "retry-after-ms": str(seconds * 1000)})


def pii_rule_timeout(kind: str) -> GatewayError:
    # 500, not a 4xx: the request is sound, the organisation's rule is not; and unchecked text is never sent on.
    return GatewayError(500, f"Personal data in this request could not be checked: the organisation's PII rule "
                             f"`{kind}` ran past its time budget, so the request was not sent on. The rule needs "
                             f"fixing; tell your platform team (the gateway's log names it).", type="server_error",
                        code="pii_rule_timeout")


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, type="timeout", code="upstream_timeout")


def upstream_error(message: str) -> GatewayError:
    return GatewayError(502, message, type="server_error", code="upstream_error")


# The types OpenAI's API answers with; anything else a model server says is mapped onto them by status.
OPENAI_TYPES = frozenset({"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                          "rate_limit_error", "insufficient_quota", "server_error", "timeout", "requests", "tokens"})
_ENDPOINTS = {"/v1/chat/completions": "a chat model", "/v1/completions": "a text-completion model",
              "/v1/embeddings": "an embeddings model"}


def from_upstream(status: int, data: bytes, model: str, path: str) -> GatewayError:
    """A model server's refusal as the OpenAI error object clients act on.

    vLLM answers with its own types ("BadRequestError", "Bad Request"), integer codes and FastAPI field paths
    ("body.temperature"), and a server that lacks the endpoint (embeddings from a chat model) with FastAPI's bare
    {"detail": "Not Found"}. Clients branch on OpenAI's types and codes: `context_length_exceeded` is what makes
    LangChain and others trim a conversation and retry.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    inner = obj.get("error", obj) if isinstance(obj, dict) else None
    if not isinstance(inner, dict):
        inner = {}
    message, detail = inner.get("message"), inner.get("detail")
    if status == 404 and detail == "Not Found" and not message:
        return GatewayError(404, f"`{model}` is not {_ENDPOINTS.get(path, 'served on ' + path)}: its model server has "
                                 f"no {path}.", code="unsupported_endpoint", param="model")
    if status == 404 and isinstance(message, str) and "does not exist" in message:
        return model_not_found(model)  # an adapter unloaded a moment ago; vLLM's text would list other names
    if not isinstance(message, str) or not message:
        message = detail if isinstance(detail, str) and detail else (
            data.decode("utf-8", "replace")[:500] or f"The model server answered HTTP {status}.")
    if status == 400 and _VALIDATION_DUMP.match(message):
        message = _validation_message(message)
    if status == 400 and "--tool-call-parser" in message:  # vLLM's words are for whoever starts the server
        return GatewayError(400, f"`{model}` is served without tool calling: its serving profile sets no "
                                 f"`tool_call_parser` (the parser of the model's tool-call format: hermes, "
                                 f"llama3_json, mistral, ...). Ask the platform team to set one, or send the request "
                                 f"without `tools`.", code="tools_not_supported", param="tools")
    code = inner.get("code") if isinstance(inner.get("code"), str) else None
    if code is None and "maximum context length" in message:
        code = "context_length_exceeded"
    param = inner.get("param") if isinstance(inner.get("param"), str) else None
    if param is not None and param.startswith("body."):
        param = param[len("body."):]
    upstream_type = inner.get("type")
    if status >= 500:
        type_ = "server_error"
    else:
        type_ = upstream_type if isinstance(upstream_type, str) and upstream_type in OPENAI_TYPES \
            else "invalid_request_error"
    return GatewayError(status, message, type=type_, code=code, param=param)


# vLLM's 400 for a field of the wrong type is pydantic's errors as Python reprs, one per line:
# "1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.temperature', 'msg': 'Input should be ...', ...}"
_VALIDATION_DUMP = re.compile(r"\d+ validation errors?:\n")


def _validation_message(message: str) -> str:
    """Each of pydantic's errors as `field`: what is wrong (got VALUE); the message unchanged if it does not parse."""
    parts = []
    for line in message.splitlines()[1:]:
        try:
            err = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return message
        if not isinstance(err, dict) or not isinstance(err.get("msg"), str):
            return message
        loc = err.get("loc")
        field = ".".join(str(p) for p in loc) if isinstance(loc, (list, tuple)) else str(loc or "")
        field = field.removeprefix("body.")
        got = f" (got {_short(repr(err['input']))})" if "input" in err else ""
        parts.append(f"`{field}`: {err['msg']}{got}" if field else f"{err['msg']}{got}")
    return "; ".join(parts) + "." if parts else message


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"No route for {path}.", code="unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"{method} is not allowed on {path}.", code="method_not_allowed")
