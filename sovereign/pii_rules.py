"""An organisation's own kinds of personal data, in one file that the gateway and the fine-tune pipeline both load.

The built-in kinds (`sovereign.pii`) know phones, ID numbers, cards, e-mails and addresses; a bank's customer numbers,
an insurer's policy numbers or a case ID are its own. They go in `$SOVEREIGN_HOME/pii-rules.yaml` (or the file that
`SOVEREIGN_PII_RULES` names), so that a team's pii=redact in the gateway and the scrubbing before training hide the
same things:

    kinds:
      customer_id:
        pattern: 'CUST-[0-9]{8}'
        placeholder: '[CUSTOMER_ID]'   # default: the kind in capitals, in brackets
        examples: ['CUST-00412345']    # each must be found whole, checked at every start
        ignore_case: false
        whole_word: true               # not inside a longer code: XCUST-00412345, CUST-004123456-7

Everything is checked when the file is loaded, so a gateway or a fine-tune job refuses to start on a rule that would
misbehave, and a running gateway refuses such a change (`gateway.pii_watch`), naming the kind: a pattern that does
not compile or matches nothing at all, a placeholder that some pattern finds (redaction would not be idempotent), an
example not found whole.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sovereign import pii
from sovereign.errors import ConfigError
from sovereign.settings import HomeSettings, describe_validation_error

ENV_VAR = "SOVEREIGN_PII_RULES"
FILE_NAME = "pii-rules.yaml"
_KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]{0,39}\]")  # no digits: no built-in kind finds it


class KindRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(min_length=1)
    placeholder: str | None = None
    examples: list[str] = Field(default_factory=list)
    ignore_case: bool = False
    whole_word: bool = True

    @field_validator("placeholder")
    @classmethod
    def _placeholder_shape(cls, value: str | None) -> str | None:
        if value is not None and not _PLACEHOLDER.fullmatch(value):
            raise ValueError("must be capital letters or _ in brackets, like [CUSTOMER_ID]")
        return value


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kinds: dict[str, KindRule] = Field(default_factory=dict)


class PiiRules(BaseModel):
    """What was loaded: where from, its SHA-256 (for lineage) and the kinds it adds."""

    file: str | None = None
    sha256: str | None = None
    kinds: list[str] = Field(default_factory=list)


def rules_path() -> Path | None:
    """The file named by SOVEREIGN_PII_RULES (which must exist), else $SOVEREIGN_HOME/pii-rules.yaml if it exists."""
    named = os.environ.get(ENV_VAR)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{ENV_VAR}={named}: no such file", code="config_not_found")
        return path
    default = HomeSettings().home / FILE_NAME
    return default if default.is_file() else None


def read_rules(text: str, where: str) -> RulesFile:
    """A rules file's text, validated; ConfigError naming `where` and the field."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    try:
        return RulesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def compile_rules(spec: RulesFile, where: str) -> tuple[pii.CustomKind, ...]:
    """The kinds of a rules file; ConfigError naming `where` and the kind when one is unusable."""
    out = [_compile_kind(kind, rule, f"{where}: kinds.{kind}") for kind, rule in spec.kinds.items()]
    _check_placeholders(out, where)
    return tuple(out)


def _compile_kind(kind: str, rule: KindRule, where: str) -> pii.CustomKind:
    if not _KIND_NAME.fullmatch(kind):
        raise ConfigError(f"{where}: a kind's name is lower-case letters, digits and _ (at most 40), starting with a "
                          f"letter")
    if kind in pii.KINDS:
        raise ConfigError(f"{where}: {kind!r} is a built-in kind; give yours another name")
    try:
        bare = regex.compile(rule.pattern, regex.V0)  # the engine and syntax `sovereign.pii` runs it with
        custom = pii.CustomKind.compile(kind, rule.pattern, rule.placeholder or f"[{kind.upper()}]",
                                        ignore_case=rule.ignore_case, whole_word=rule.whole_word)
    except regex.error as exc:
        raise ConfigError(f"{where}.pattern does not compile: {exc}") from None
    if bare.fullmatch("") is not None:
        raise ConfigError(f"{where}.pattern matches the empty string, so it would find personal data everywhere")
    for what, text in _probes(rule.examples):
        try:
            pii.custom_matches(custom, text, PROBE_BUDGET_S)
        except pii.PiiRuleTimeout:
            raise ConfigError(f"{where}.pattern backtracks catastrophically: on {len(text):,} characters of {what} it "
                              f"ran past {PROBE_BUDGET_S * 1000:.0f} ms (requests may carry megabytes); rewrite it "
                              f"without nested or overlapping repetition ('(a+)+', '(a|ab)*'), or make the "
                              f"repetition possessive ('[0-9]++')") from None
    return custom


# Texts on which a pattern with nested or overlapping repetition backtracks for seconds or forever: runs of the
# characters such patterns repeat, and the rule's examples with one character or pair stretched (what follows a
# literal prefix: CASE-abab...), each ending in a character that fails the match. A sound pattern is through each in
# microseconds; the runtime budget (`pii.rule_budget_s`) still guards what these miss.
PROBE_CHARS = 2_000
PROBE_BUDGET_S = 0.25
_RUNS = ("a", "A", "0", " ", "-", ".", "_", "aA0", "word ", "A-", "0-", "0 ", "a.")


def _probes(examples: list[str]) -> Iterator[tuple[str, str]]:
    for unit in _RUNS:
        yield f"{unit!r} repeated", unit * (PROBE_CHARS // len(unit)) + "!"
    seen: set[str] = set()
    for example in examples:
        for i in range(len(example)):
            for unit in dict.fromkeys((example[i], example[i:i + 2])):
                text = example[:i] + unit * (PROBE_CHARS // len(unit)) + "!"
                if text not in seen:
                    seen.add(text)
                    yield f"its example {example!r} with {unit!r} repeated", text


def _check_placeholders(custom: list[pii.CustomKind], where: str) -> None:
    seen: dict[str, str] = {v: k for k, v in pii.PLACEHOLDERS.items()}
    for c in custom:
        if c.placeholder in seen:
            owner = seen[c.placeholder]
            raise ConfigError(f"{where}: kinds.{c.kind}: placeholder {c.placeholder} is already {owner}'s")
        seen[c.placeholder] = c.kind
    for c in custom:
        for placeholder in seen:
            if pii.custom_matches(c, placeholder):
                raise ConfigError(f"{where}: kinds.{c.kind}.pattern finds the placeholder {placeholder}: a redacted "
                                  f"text would be redacted again; make the pattern stricter")


def _check_examples(spec: RulesFile, where: str) -> None:
    for kind, rule in spec.kinds.items():
        for example in rule.examples:
            found = [(m.kind, m.text) for m in pii.find_pii(example)]
            if found != [(kind, example)]:
                got = ", ".join(f"{k} {t!r}" for k, t in found) or "nothing"
                raise ConfigError(f"{where}: kinds.{kind}.examples: {example!r} is not found whole as {kind} "
                                  f"(found {got})")


def install(path: Path | None = None) -> PiiRules:
    """Load the rules file (`rules_path()` unless given) and make `sovereign.pii` find its kinds; without a file,
    only the built-in kinds. A bad file raises ConfigError and leaves the kinds found before in place."""
    path = path if path is not None else rules_path()
    if path is None:
        return uninstall()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the PII rules: {exc.strerror}", code="config_not_found") from None
    return install_bytes(raw, path)


def install_bytes(raw: bytes, path: Path) -> PiiRules:
    """`install` for a rules file already read (a watcher hashes what it read, and installs exactly that)."""
    spec = read_rules(raw.decode("utf-8", errors="replace"), str(path))
    custom = compile_rules(spec, str(path))
    previous = pii.use_custom_kinds(custom)
    try:
        _check_examples(spec, str(path))
    except ConfigError:
        pii.use_custom_kinds(previous)
        raise
    return _installed_now(PiiRules(file=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                                   kinds=[c.kind for c in custom]))


def uninstall() -> PiiRules:
    """Only the built-in kinds from now, as without a rules file."""
    pii.use_custom_kinds(())
    return _installed_now(PiiRules())


_installed = PiiRules()


def installed() -> PiiRules:
    """The rules file `sovereign.pii` finds kinds from now (empty: built-in kinds only)."""
    return _installed


def _installed_now(rules: PiiRules) -> PiiRules:
    global _installed
    _installed = rules
    return rules
