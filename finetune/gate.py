"""The training–serving consistency gate: a job succeeds only when the served adapter is the one that was trained.

Four checks against the running vLLM (over HTTP, the only way finetune talks to serving):

1. tokenization: the token ids the trainer renders for held-out prompts (chat template, generation prompt) equal
   what vLLM's `/tokenize` returns for the same messages. Template drift is the most common silent failure.
2. adapter_loaded: the published adapter shows in `/v1/models` as a child of the base model (the supervisor
   hot-loads it from the registry); if the supervisor refused it, its reason is quoted.
3. adapter_active: the served adapter measurably changes log-probs versus the base on held-out conversations
   (prompt log-probs of the trainer's token ids, and the greedy answer). A no-op adapter fails here.
4. adapter_matches: the served log-probs of the assistant tokens equal, within the engine's own numeric noise, what
   transformers + peft compute in-process from the published adapter folder (`GateReference`, made by
   `finetune.evaluate.gate_reference`). An adapter vLLM loads only in part (ignored modules, another LoRA scaling)
   passes check 3 and fails here. The noise is measured, not assumed: served base vs transformers base.

Check 4 runs only when `run_gate` is given a reference; the job runner always gives one.

Besides the checks, the gate measures how the served model calls tools (`ToolCallStats`), base and adapter, on
held-out prompts whose reference answer is a tool call: through vLLM's own tool-call parser, as apps will get them.
A loss that fell says the model learned the call's form; only this says whether it picks the right tool with the
right arguments. It is a figure for people, not a check: how good is good enough is the team's call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import BaseModel, Field

from finetune.masking import IGNORE_INDEX, ChatEncoder, Conversation, conversation_parts, with_messages


class GateSettings(BaseModel):
    """Where the served vLLM is and how strict the gate is."""

    serving_url: str = "http://127.0.0.1:8000"
    health_url: str | None = None  # the supervisor's health port: lets a refusal be explained
    samples: int = Field(4, ge=1)  # held-out conversations checked
    load_timeout_s: float = Field(180, gt=0)  # how long the supervisor may take to hot-load the adapter
    request_timeout_s: float = Field(300, gt=0)
    # Mean |Δ log-prob| per assistant token below which the adapter counts as a no-op. Same-model float32 noise on
    # vLLM's CPU backend is ~1e-6; a trained adapter moves it by 1e-2 or more.
    min_mean_logprob_delta: float = Field(1e-3, gt=0)
    answer_max_tokens: int = Field(32, ge=1)
    tool_samples: int = Field(8, ge=0)  # held-out prompts answered with a tool call, for ToolCallStats; 0: none
    tool_max_tokens: int = Field(160, ge=1)  # room for a call with its arguments
    # adapter_matches: mean |served - trained adapter log-prob| per assistant token at most max(min_match_tolerance,
    # match_noise_factor * noise, match_effect_fraction * effect), noise being that distance on the base model.
    # vLLM's float32 CPU build measured noise ~2e-3 (an AVX512-BF16 host; far above float32 rounding, so it is
    # measured per run, not assumed); correct adapters 1.0-1.5x it (ci-smoke trained: 1.6e-3), v_proj not served
    # 0.1-1.3, MLP not served 0.4. The gap grows with the adapter's effect (rounding blown up: bf16 vs fp32 inside
    # transformers grows alike), so a fraction of the effect is allowed too: mismatch/effect measured ~0.002 for
    # correct adapters moving log-probs 0.8-1.5 nats a token (a trained one included), 0.074 for a random one moving
    # them 16.5 (a wrecked model: it fails), and 0.13-0.85 for adapters served in part (v_proj or MLP ignored).
    min_match_tolerance: float = Field(1e-3, gt=0)
    match_noise_factor: float = Field(3.0, gt=0)
    match_effect_fraction: float = Field(0.05, ge=0)


class ReferenceLogprobs(BaseModel):
    """One held-out conversation scored in-process: per-token log-probs (None for the first token)."""

    input_ids: list[int]
    base: list[float | None]
    adapter: list[float | None]


class GateReference(BaseModel):
    """What the trained adapter does, for `gate_sample`'s conversations in order."""

    conversations: list[ReferenceLogprobs]


class GateCheck(BaseModel):
    name: str
    passed: bool
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ToolCallStats(BaseModel):
    """How a served model answered held-out prompts whose reference answer is a tool call (greedy, vLLM's parser)."""

    prompts: int
    called: int  # answered with at least one tool call that the parser read
    right_function: int  # its first call names the reference's first function
    exact: int  # the reference's calls exactly: names and arguments (as JSON values), in order
    examples: list[dict[str, Any]] = Field(default_factory=list)  # a few, for people to read

    def summary(self) -> str:
        return (f"{self.exact}/{self.prompts} exact, {self.right_function} right function, "
                f"{self.called} called")

    def counts(self, prefix: str = "") -> dict[str, int]:
        """The four numbers as a job event's data: `{prefix}tool_calls_exact`, ..."""
        return {f"{prefix}tool_calls_{k}": getattr(self, k) for k in ("prompts", "called", "right_function", "exact")}


class GateReport(BaseModel):
    served_name: str
    base_model: str
    serving_url: str
    passed: bool
    checks: list[GateCheck]
    tool_calls: dict[str, ToolCallStats] | None = None  # "base", "adapter"; None without held-out tool calls
    tool_calls_error: str | None = None  # why they could not be measured

    def failure_message(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        return "; ".join(f"{c.name}: {c.message}" for c in failed) or "all checks passed"


class GateFailed(Exception):
    """Raised by `require_pass`; carries the report so the job can record it."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(f"consistency gate failed for {report.served_name}: {report.failure_message()}")
        self.report = report


def prompt_and_answer(conversation: Conversation) -> tuple[Conversation, str] | None:
    """Split a conversation at its last assistant turn: (the conversation before it, its content)."""
    messages = conversation_parts(conversation)[0]
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return with_messages(conversation, messages[:i]), str(messages[i].get("content") or "")
    return None


def _chat_body(model: str, conversation: Conversation) -> dict[str, Any]:
    messages, tools = conversation_parts(conversation)
    return {"model": model, "messages": messages, **({"tools": tools} if tools else {})}


Call = tuple[str, Any]  # a function's name and its arguments, parsed as JSON where they are JSON


def _call(call: Any) -> Call:
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return str(fn.get("name")), arguments


def tool_call_samples(conversations: Sequence[Conversation], samples: int) -> list[tuple[Conversation, list[Call]]]:
    """Held-out prompts answered with a tool call: (the conversation up to its first call turn, the calls made)."""
    out = []
    for conversation in conversations:
        messages, tools = conversation_parts(conversation)
        turn = next((i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("tool_calls")), None)
        if tools and turn is not None:
            out.append((with_messages(conversation, messages[:turn]), [_call(c) for c in messages[turn]["tool_calls"]]))
            if len(out) == samples:
                break
    return out


def gate_sample(conversations: Sequence[Conversation], samples: int) -> list[Conversation]:
    """The held-out conversations the gate checks; the in-process reference must score exactly these."""
    return [m for m in conversations if prompt_and_answer(m)][:samples]


class _Vllm:
    def __init__(self, settings: GateSettings) -> None:
        self.s = settings
        self.http = httpx.Client(base_url=settings.serving_url.rstrip("/"), timeout=settings.request_timeout_s,
                                 trust_env=False)
        # adapter_active and adapter_matches read the same prompt log-probs: fetched once per (model, ids).
        self._logprobs: dict[tuple[str, tuple[int, ...]], list[float | None]] = {}

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise GateHttpError(f"POST {path} -> {r.status_code}: {r.text[:400]}")
        return r.json()

    def models(self) -> list[dict[str, Any]]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return r.json().get("data", [])

    def tokenize_chat(self, model: str, conversation: Conversation) -> list[int]:
        body = {**_chat_body(model, conversation), "add_generation_prompt": True, "add_special_tokens": False}
        return list(self._post("/tokenize", body)["tokens"])

    def prompt_logprobs(self, model: str, ids: list[int]) -> list[float | None]:
        """Log-prob vLLM gives each token of `ids` (None for the first) under `model`."""
        key = (model, tuple(ids))
        if key in self._logprobs:
            return self._logprobs[key]
        body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        entries = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
        out: list[float | None] = []
        for tok, entry in zip(ids, entries, strict=True):
            if entry is None:
                out.append(None)
                continue
            hit = entry.get(str(tok))
            out.append(float(hit["logprob"]) if hit is not None else None)
        self._logprobs[key] = out
        return out

    def greedy(self, model: str, conversation: Conversation) -> dict[str, Any]:
        body = {**_chat_body(model, conversation), "max_tokens": self.s.answer_max_tokens, "temperature": 0,
                "logprobs": True, "top_logprobs": 5}
        choice = self._post("/v1/chat/completions", body)["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        calls = "".join(f"[tool_call {c['function']['name']}] {c['function']['arguments']}"
                        for c in choice["message"].get("tool_calls") or ())
        return {"text": (choice["message"]["content"] or "") + calls, "logprobs": [c["logprob"] for c in content],
                "finish_reason": choice.get("finish_reason")}

    def tool_calls(self, model: str, conversation: Conversation) -> tuple[list[Call], str]:
        """The calls vLLM's parser reads from `model`'s greedy answer, and the answer's text."""
        body = {**_chat_body(model, conversation), "max_tokens": self.s.tool_max_tokens, "temperature": 0}
        message = self._post("/v1/chat/completions", body)["choices"][0]["message"]
        return [_call(c) for c in message.get("tool_calls") or ()], message.get("content") or ""

    def refusal(self, served_name: str) -> str | None:
        if not self.s.health_url:
            return None
        try:
            status = httpx.get(f"{self.s.health_url.rstrip('/')}/status", timeout=10, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return None
        return (status.get("adapters_refused") or {}).get(served_name)


class GateHttpError(Exception):
    pass


def check_tokenization(vllm: _Vllm, encoder: ChatEncoder, prompts: Sequence[Conversation], base_model: str
                       ) -> GateCheck:
    tokenizer = encoder.tokenizer
    served = [m["id"] for m in vllm.models()]
    if base_model not in served:
        return GateCheck(name="tokenization", passed=False, details={"served": served},
                         message=f"{vllm.s.serving_url} serves {served}, not the base model {base_model!r}; point "
                                 f"the gate (SOVEREIGN_FINETUNE_SERVING_URL) at the vLLM serving it")
    mismatches = []
    for idx, messages in enumerate(prompts):
        ours = encoder.render_ids(messages, add_generation_prompt=True)
        served = vllm.tokenize_chat(base_model, messages)
        if ours != served:
            at = next((i for i, (a, b) in enumerate(zip(ours, served)) if a != b), min(len(ours), len(served)))
            mismatches.append({
                "sample": idx, "trainer_len": len(ours), "served_len": len(served), "first_difference": at,
                "trainer_text": tokenizer.decode(ours[max(0, at - 8):at + 8]),
                "served_text": tokenizer.decode(served[max(0, at - 8):at + 8]),
            })
    if mismatches:
        m = mismatches[0]
        return GateCheck(name="tokenization", passed=False, details={"mismatches": mismatches},
                         message=(f"{len(mismatches)}/{len(prompts)} held-out prompts tokenize differently in the "
                                  f"trainer and in the served vLLM (chat template or tokenizer drift): first at "
                                  f"token {m['first_difference']}: trainer {m['trainer_text']!r} vs served "
                                  f"{m['served_text']!r}; train with the served model's own template"))
    return GateCheck(name="tokenization", passed=True, details={"prompts": len(prompts)},
                     message=f"{len(prompts)} held-out prompts tokenize identically")


def check_loaded(vllm: _Vllm, served_name: str, base_model: str) -> GateCheck:
    deadline = time.monotonic() + vllm.s.load_timeout_s
    while True:
        models = {m["id"]: m for m in vllm.models()}
        if served_name in models:
            parent = models[served_name].get("parent")
            if parent not in (None, base_model):
                return GateCheck(name="adapter_loaded", passed=False, details={"parent": parent},
                                 message=f"{served_name} is served on {parent!r}, not on {base_model!r}")
            return GateCheck(name="adapter_loaded", passed=True, details={"parent": parent},
                             message=f"{served_name} is listed in {vllm.s.serving_url}/v1/models")
        reason = vllm.refusal(served_name)
        if reason:
            return GateCheck(name="adapter_loaded", passed=False, details={"refused": reason},
                             message=f"the serving supervisor refused {served_name}: {reason}")
        if time.monotonic() >= deadline:
            return GateCheck(name="adapter_loaded", passed=False, details={"served": sorted(models)},
                             message=f"{served_name} did not appear in {vllm.s.serving_url}/v1/models within "
                                     f"{vllm.s.load_timeout_s:g}s (served: {sorted(models)}); is the supervisor "
                                     f"watching the same SOVEREIGN_HOME adapters directory?")
        time.sleep(0.5)


def check_active(vllm: _Vllm, encoder: ChatEncoder, conversations: Sequence[Conversation], base_model: str,
                 served_name: str) -> GateCheck:
    deltas: list[float] = []
    nll = {"base": 0.0, "adapter": 0.0}
    n_tokens = 0
    answers = []
    for messages in conversations:
        encoded = encoder.encode(messages)
        ids, labels = encoded.input_ids, encoded.labels
        base_lp = vllm.prompt_logprobs(base_model, ids)
        ada_lp = vllm.prompt_logprobs(served_name, ids)
        for i, label in enumerate(labels):
            if label == IGNORE_INDEX or base_lp[i] is None or ada_lp[i] is None:
                continue
            deltas.append(abs(ada_lp[i] - base_lp[i]))
            nll["base"] -= base_lp[i]
            nll["adapter"] -= ada_lp[i]
            n_tokens += 1
        split = prompt_and_answer(messages)
        if split and len(answers) < 2:
            b, a = vllm.greedy(base_model, split[0]), vllm.greedy(served_name, split[0])
            answers.append({"base": b["text"], "adapter": a["text"], "same": b["text"] == a["text"]})
    if n_tokens == 0:
        return GateCheck(name="adapter_active", passed=False, details={},
                         message="no assistant tokens in the held-out sample to compare; check the masking")
    mean_delta = sum(deltas) / n_tokens
    details = {
        "assistant_tokens": n_tokens, "mean_abs_logprob_delta": mean_delta, "max_abs_logprob_delta": max(deltas),
        "served_loss_base": nll["base"] / n_tokens, "served_loss_adapter": nll["adapter"] / n_tokens,
        "greedy_answers_differ": sum(not a["same"] for a in answers), "greedy_samples": answers,
    }
    if mean_delta < vllm.s.min_mean_logprob_delta:
        return GateCheck(name="adapter_active", passed=False, details=details,
                         message=(f"{served_name} does not change what vLLM serves: mean |Δ log-prob| "
                                  f"{mean_delta:.2e} over {n_tokens} assistant tokens (threshold "
                                  f"{vllm.s.min_mean_logprob_delta:g}); the adapter is a no-op (LoRA B all zero?) "
                                  f"or vLLM ignores it"))
    return GateCheck(name="adapter_active", passed=True, details=details,
                     message=(f"mean |Δ log-prob| {mean_delta:.3g} over {n_tokens} assistant tokens; served loss "
                              f"base {details['served_loss_base']:.4f} -> adapter "
                              f"{details['served_loss_adapter']:.4f}"))


def check_matches(vllm: _Vllm, encoder: ChatEncoder, conversations: Sequence[Conversation], base_model: str,
                  served_name: str, reference: GateReference) -> GateCheck:
    noise: list[float] = []
    mismatch: list[float] = []
    effect: list[float] = []
    if len(reference.conversations) != len(conversations):
        return GateCheck(name="adapter_matches", passed=False, details={},
                         message=f"the in-process reference scores {len(reference.conversations)} conversations, the "
                                 f"gate checks {len(conversations)}; compute it on `gate_sample` with the same samples")
    for messages, ref in zip(conversations, reference.conversations):
        encoded = encoder.encode(messages)
        if encoded.input_ids != ref.input_ids:
            return GateCheck(name="adapter_matches", passed=False, details={},
                             message="the in-process reference was computed on other token ids than the gate's; "
                                     "compute it with the same encoder and `gate_sample`")
        base_lp = vllm.prompt_logprobs(base_model, encoded.input_ids)
        ada_lp = vllm.prompt_logprobs(served_name, encoded.input_ids)
        for i, label in enumerate(encoded.labels):
            values = (base_lp[i], ada_lp[i], ref.base[i], ref.adapter[i])
            if label == IGNORE_INDEX or None in values:
                continue
            noise.append(abs(base_lp[i] - ref.base[i]))
            mismatch.append(abs(ada_lp[i] - ref.adapter[i]))
            effect.append(abs(ref.adapter[i] - ref.base[i]))
    n = len(mismatch)
    if n == 0:
        return GateCheck(name="adapter_matches", passed=False, details={},
                         message="no assistant tokens in the held-out sample to compare; check the masking")
    mean_noise, mean_mismatch, mean_effect = sum(noise) / n, sum(mismatch) / n, sum(effect) / n
    s = vllm.s
    tolerance = max(s.min_match_tolerance, s.match_noise_factor * mean_noise, s.match_effect_fraction * mean_effect)
    details = {"assistant_tokens": n, "noise": mean_noise, "mismatch": mean_mismatch, "effect": mean_effect,
               "max_mismatch": max(mismatch), "tolerance": tolerance}
    if mean_mismatch > tolerance:
        return GateCheck(name="adapter_matches", passed=False, details=details,
                         message=(f"vLLM serves {served_name} differently from how it was trained: mean |Δ log-prob| "
                                  f"{mean_mismatch:.2e} vs the trained adapter over {n} assistant tokens, against "
                                  f"{mean_noise:.2e} between vLLM and transformers on the base model (tolerance "
                                  f"{tolerance:.2e}; the adapter itself moves them by {details['effect']:.2e}); vLLM "
                                  f"may have loaded the adapter only in part (unsupported target modules, "
                                  f"rank/alpha patterns, rslora) or the export changed the weights: train only "
                                  f"modules vLLM serves, with one rank and alpha and no rslora, and publish the "
                                  f"trainer's files unchanged"))
    return GateCheck(name="adapter_matches", passed=True, details=details,
                     message=(f"served log-probs match the trained adapter: mean |Δ| {mean_mismatch:.2e} over {n} "
                              f"assistant tokens (base-model noise {mean_noise:.2e}, adapter effect "
                              f"{details['effect']:.2e})"))


def measure_tool_calls(vllm: _Vllm, samples: Sequence[tuple[Conversation, list[Call]]],
                       models: dict[str, str]) -> dict[str, ToolCallStats]:
    """`ToolCallStats` per entry of `models` (label -> served name), every request at once: vLLM batches them."""
    jobs = [(label, model, prompt, want) for label, model in models.items() for prompt, want in samples]
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        answers = list(pool.map(lambda job: vllm.tool_calls(job[1], job[2]), jobs))
    stats = {label: ToolCallStats(prompts=len(samples), called=0, right_function=0, exact=0) for label in models}
    for (label, _, prompt, want), (got, text) in zip(jobs, answers):
        s = stats[label]
        s.called += bool(got)
        s.right_function += bool(got) and got[0][0] == want[0][0]
        s.exact += got == want
        if len(s.examples) < 3:
            messages = conversation_parts(prompt)[0]
            s.examples.append({"prompt": str(messages[-1].get("content") or "") if messages else "",
                               "reference": [list(c) for c in want], "calls": [list(c) for c in got],
                               "text": text[:200]})
    return stats


def run_gate(*, encoder: ChatEncoder, conversations: Sequence[Conversation], base_model: str, served_name: str,
             settings: GateSettings, reference: GateReference | None = None) -> GateReport:
    """Run the checks on `gate_sample`'s held-out conversations; never raises for a failed check.

    adapter_matches runs only with a `reference` (finetune.evaluate.gate_reference on the published folder).
    """
    sample = gate_sample(conversations, settings.samples)
    vllm = _Vllm(settings)
    checks: list[GateCheck] = []
    try:
        if not sample:
            checks.append(GateCheck(name="tokenization", passed=False, message="no held-out conversation with an "
                                    "assistant turn to check"))
        else:
            checks.append(_guard("tokenization", lambda: check_tokenization(
                vllm, encoder, [prompt_and_answer(m)[0] for m in sample], base_model)))
        loaded = _guard("adapter_loaded", lambda: check_loaded(vllm, served_name, base_model))
        checks.append(loaded)
        if loaded.passed and sample:
            checks.append(_guard("adapter_active", lambda: check_active(
                vllm, encoder, sample, base_model, served_name)))
            if reference is not None:
                checks.append(_guard("adapter_matches", lambda: check_matches(
                    vllm, encoder, sample, base_model, served_name, reference)))
        elif not loaded.passed:
            unchecked = ["adapter_active"] + (["adapter_matches"] if reference is not None else [])
            for name in unchecked:
                checks.append(GateCheck(name=name, passed=False, message="not checked: the adapter is not served"))
        report = GateReport(served_name=served_name, base_model=base_model, serving_url=settings.serving_url,
                            passed=all(c.passed for c in checks), checks=checks)
        tool_samples = tool_call_samples(conversations, settings.tool_samples) if report.passed else []
        if tool_samples:
            try:
                report.tool_calls = measure_tool_calls(vllm, tool_samples, {"base": base_model,
                                                                            "adapter": served_name})
            except (httpx.HTTPError, GateHttpError) as exc:
                report.tool_calls_error = f"the served vLLM did not answer as expected: {exc}"
    finally:
        vllm.close()
    return report


def require_pass(report: GateReport) -> GateReport:
    if not report.passed:
        raise GateFailed(report)
    return report


def _guard(name: str, fn: Callable[[], GateCheck]) -> GateCheck:
    """A server that cannot be reached fails the check with the reason, not the job with a traceback."""
    try:
        return fn()
    except (httpx.HTTPError, GateHttpError) as exc:
        return GateCheck(name=name, passed=False, message=f"the served vLLM did not answer as expected: {exc}")

