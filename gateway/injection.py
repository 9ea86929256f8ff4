"""A small heuristic prompt-injection detector (English and Chinese).

It looks for the classic phrasings (ignore previous instructions, reveal the system prompt, pretend to be / developer
mode, 忽略之前的指令 …). It is a flag for the audit trail and for teams that choose to block, not a security boundary:
it misses paraphrases and that is why the default policy only flags.
"""

from __future__ import annotations

import re

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("ignore_instructions", re.compile(
        r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(previous|prior|above|earlier|all|your|system|"
        r"the)\b[^.\n]{0,30}\b(instructions?|prompts?|rules?|directives?|guidelines?|context)\b", re.I)),
    ("reveal_system_prompt", re.compile(
        r"\b(reveal|show|print|repeat|output|leak|tell me)\b[^.\n]{0,40}\b(system|hidden|initial|original)\s+"
        r"(prompt|instructions?|message)", re.I)),
    ("role_override", re.compile(
        r"\b(you are now|from now on,? you|act as an? (unrestricted|unfiltered|jailbroken)|developer mode|"
        r"do anything now|\bDAN\b mode|jailbreak)", re.I)),
    ("fake_system_turn", re.compile(r"(^|\n)\s*(###\s*)?(system|assistant)\s*:|<\|im_start\|>\s*system|\[/?INST\]",
                                    re.I)),
    ("ignore_instructions_zh", re.compile(r"(忽略|无视|忘记|忘掉|跳过)[^。\n]{0,12}(之前|以上|上面|前面|先前|所有|系统)"
                                          r"[^。\n]{0,8}(指令|指示|提示|规则|要求|设定)")),
    ("reveal_system_prompt_zh", re.compile(r"(泄露|显示|输出|告诉我|打印|重复)[^。\n]{0,10}(系统提示|系统指令|初始指令|"
                                           r"隐藏指令|提示词)")),
    ("role_override_zh", re.compile(r"(你现在是|从现在开始你|扮演一个?(没有|不受)[^。\n]{0,6}(限制|约束)|开发者模式|越狱)")),
]


# One pass over the text for the common case (nothing suspicious); the named patterns run only after a hit.
_ANY = re.compile("|".join(f"(?:{p.pattern})" for _, p in _PATTERNS), re.I)
# Every pattern above needs one of these words, and looking for plain words in the case-folded text is several times
# cheaper than _ANY on a prompt that has none (the usual case; measured 19 -> 3 µs on a 60-character prompt; a regex
# alternation of the words is as slow as _ANY). Keep this list in step with the patterns.
_TRIGGERS = ("ignore", "disregard", "forget", "override", "bypass", "reveal", "show", "print", "repeat", "output", "leak",
             "tell me", "you are now", "from now on", "act as", "developer mode", "do anything now", "dan", "jailbreak",
             "system", "assistant", "inst]", "忽略", "无视", "忘记", "忘掉", "跳过", "泄露", "显示", "输出", "告诉我", "打印", "重复",
             "你现在是", "从现在开始你", "扮演", "开发者模式", "越狱")


def detect_injection(text: str) -> list[str]:
    """Names of the heuristics that fire on `text` (empty: nothing suspicious)."""
    if not text:
        return []
    folded = text.casefold()
    if not any(word in folded for word in _TRIGGERS) or _ANY.search(text) is None:
        return []
    return [name for name, pattern in _PATTERNS if pattern.search(text)]
