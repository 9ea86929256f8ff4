"""Model servers' refusals become OpenAI error objects: the bodies below are what vLLM 0.32's server answered."""

import orjson
import pytest

from gateway.errors import from_upstream


def _err(status: int, body: dict, path: str = "/v1/chat/completions") -> dict:
    err = from_upstream(status, orjson.dumps(body), "m", path)
    assert err.status == status
    return orjson.loads(err.body())["error"]


def test_context_length_gets_openais_code():
    e = _err(400, {"error": {"message": "This model's maximum context length is 4096 tokens. However, your prompt "
                                        "contains at least 4097 input tokens.", "type": "BadRequestError",
                             "param": "input_tokens", "code": 400}})
    assert e["type"] == "invalid_request_error" and e["code"] == "context_length_exceeded"
    assert e["message"].startswith("This model's maximum context length is 4096 tokens.")
    assert e["param"] == "input_tokens"


@pytest.mark.parametrize("body,param", [
    ({"error": {"message": "1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.temperature'}",
                "type": "Bad Request", "param": "body.temperature", "code": 400}}, "temperature"),
    ({"error": {"message": "top_p must be in (0, 1], got 5.0.", "type": "BadRequestError", "param": "top_p",
                "code": 400}}, "top_p"),
    ({"object": "error", "message": "older vLLM: flat", "type": "BadRequestError", "param": None, "code": 400}, None),
])
def test_vllm_types_integer_codes_and_field_paths_become_openais(body, param):
    e = _err(400, body)
    assert e["type"] == "invalid_request_error" and e["code"] is None and e["param"] == param
    assert e["message"] == (body.get("error") or body)["message"]


@pytest.mark.parametrize("message", [
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
    'tool_choice="required" requires --tool-call-parser to be set',
    'tool_choice=function "get_weather" requires --tool-call-parser to be set'])
def test_tools_on_a_model_served_without_a_tool_parser_say_what_to_do(message):
    e = _err(400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
    assert e["type"] == "invalid_request_error" and e["code"] == "tools_not_supported" and e["param"] == "tools"
    assert e["message"].startswith("`m` is served without tool calling") and "tool_call_parser" in e["message"]
    assert "--tool-call-parser" not in e["message"]


def test_an_unknown_model_reads_like_the_gateways_own_404():
    e = _err(404, {"error": {"message": "The model `m` does not exist. Valid aliases: base-model.",
                             "type": "NotFoundError", "param": "model", "code": 404}})
    assert e["code"] == "model_not_found" and "Valid aliases" not in e["message"]


@pytest.mark.parametrize("path,what", [("/v1/embeddings", "an embeddings model"),
                                       ("/v1/chat/completions", "a chat model")])
def test_a_missing_route_names_what_the_model_is_not(path, what):
    e = _err(404, {"detail": "Not Found"}, path)
    assert e["code"] == "unsupported_endpoint" and e["message"] == f"`m` is not {what}: its model server has no {path}."


def test_server_errors_and_bodies_that_are_not_json():
    e = _err(500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    assert e == {"message": "boom", "type": "server_error", "param": None, "code": None}
    err = from_upstream(502, b"<html>Bad Gateway</html>", "m", "/v1/completions")
    assert orjson.loads(err.body())["error"]["message"] == "<html>Bad Gateway</html>"
    assert from_upstream(503, b"", "m", "/v1/completions").message == "The model server answered HTTP 503."
    assert from_upstream(400, b'{"detail": "bad"}', "m", "/v1/completions").message == "bad"


@pytest.mark.parametrize("body", [{"error": "a string"}, {"error": None}, [1, 2], {"detail": [{"loc": ["body"]}]},
                                  {"error": {"message": "m", "type": ["BadRequestError"]}},
                                  {"error": {"message": "m", "type": {"a": 1}, "code": {"x": 1}, "param": 3}}])
def test_odd_bodies_still_make_an_error_object(body):
    e = _err(400, body)
    assert e["type"] == "invalid_request_error" and isinstance(e["message"], str) and e["message"]


def test_vllms_field_type_errors_read_as_sentences_naming_the_field():
    """vLLM's 400 for a wrong type is pydantic's errors as Python reprs; the client gets one line per field."""
    one = ("1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.temperature', 'msg': 'Input should be a "
           "valid number, unable to parse string as a number', 'input': 'hot'}")
    err = from_upstream(400, orjson.dumps({"error": {"message": one, "type": "BadRequestError",
                                                     "param": "body.temperature", "code": 400}}), "m", "/v1/x")
    assert err.message == ("`temperature`: Input should be a valid number, unable to parse string as a number "
                           "(got 'hot').")
    assert err.param == "temperature" and err.type == "invalid_request_error"
    two = ("2 validation errors:\n  {'type': 'float_type', 'loc': 'body.top_p', 'msg': 'Input should be a valid "
           "number', 'input': '<list of 1 items>'}\n  {'type': 'int_type', 'loc': ('body', 'n'), 'msg': 'Input "
           f"should be a valid integer', 'input': '{'x' * 200}'}}")
    message = from_upstream(400, orjson.dumps({"error": {"message": two}}), "m", "/v1/x").message
    assert message.startswith("`top_p`: Input should be a valid number (got '<list of 1 items>'); `n`: Input should "
                              "be a valid integer (got 'xxx")
    assert message.endswith("...).") and len(message) < 250
    odd = "1 validation error:\n  not a dict at all"
    assert from_upstream(400, orjson.dumps({"error": {"message": odd}}), "m", "/v1/x").message == odd
