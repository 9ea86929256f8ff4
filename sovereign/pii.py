"""Chinese and English PII: find it, redact it with typed placeholders, or just ask whether there is any.

Shared by the gateway (policy redact/block on every request, so it must be cheap) and the fine-tune scrubber (counts
per kind go into the lineage). Kinds and their placeholders:

- ``phone`` ``[PHONE]``: Chinese mobiles (1[3-9]x, optional +86/0086, spaces or dashes), Chinese landlines written
  with an area code and a dash, parentheses or spaces (010-65529988), UK-style grouped national numbers (020 7946
  0958), North-American numbers written with separators ((415) 555-0132), and any number that starts with ``+`` and
  a country code (+44 20 7946 0958). Bare digit runs other than Chinese mobiles are not phones: they are order numbers.
- ``id_number`` ``[ID_NUMBER]``: 18-character resident ID numbers (GB 11643): known province code, a real birth date
  and the ISO 7064 MOD 11-2 check character (``X`` allowed).
- ``bank_card`` ``[BANK_CARD]``: 13-19 digits, contiguous or in groups of 4 (Amex 4-6-5), passing Luhn and starting
  with a card-network prefix (Visa 4, Mastercard 51-55/2221-2720, Amex 34/37, Diners 30/36/38/39, JCB 35, UnionPay
  and Discover 6x, Chinese domestic 95x). The prefix rule is what keeps 16-digit order numbers that begin with a
  year (``2023...``) from passing Luhn one time in ten; test data must use a real network prefix to be found.
- ``email`` ``[EMAIL]``.
- ``address`` ``[ADDRESS]``: conservative, precision over recall. Chinese: an optional province/city/district chain,
  a road (路/街/大道/巷/胡同, and 道 as in 弥敦道) and a house number ending in 号, then optional building/unit/room
  parts; or a housing estate with at least two unit parts (阳光花园3栋2单元501室). English: a house number, one to
  four capitalised words and a street suffix (``221B Baker Street``), optionally ``Apt 4B`` and ``City, ST 12345`` or
  a UK postcode. A road without a house number, or a lower-case street, is not flagged.

Surprises worth knowing:

- No ``\\b``: Python's word boundary treats CJK characters as word characters, so ``电话13812345678`` would be missed.
  Explicit look-arounds on ASCII letters and digits are used instead.
- Full-width digits, letters and ``＋－（）＠．＿`` are folded to ASCII before matching (one-to-one, so offsets still
  index the original text) when the text holds a full-width digit or ``＠``.
- Overlaps resolve deterministically: the longer match wins, then the stronger-validated kind (id_number, bank_card,
  email, phone, address), then the earlier one. An 18-digit ID that also passes Luhn is one ``id_number``.
- Redaction is idempotent: placeholders contain nothing any pattern matches, and a value hidden only because it was
  glued to another match ("110101199003074514+44 20 7946 0958") is found in a second look with the matches masked.
- ``luhn_check_digit`` and ``id_check_char`` are public so that test-data generators plant values this module finds.

An organisation adds its own kinds (customer numbers, policy numbers, case IDs) in one rules file that the gateway and
the fine-tune pipeline both load (``sovereign.pii_rules``); ``use_custom_kinds`` installs them here, so every function
below finds them too. On a match of equal length an organisation's kind outranks the built-in ones: its own account
number that also passes Luhn is an account number. Their patterns run on the `regex` engine with a time budget per
text (``rule_budget_s``): a pattern that backtracks catastrophically raises ``PiiRuleTimeout`` naming its kind,
instead of holding a gateway's event loop, and every request on it, for minutes.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

from sovereign.errors import SovereignError

__all__ = [
    "KINDS",
    "PLACEHOLDERS",
    "PiiMatch",
    "contains_pii",
    "find_pii",
    "id_check_char",
    "id_number_valid",
    "luhn_check_digit",
    "luhn_valid",
    "bank_card_valid",
    "CustomKind",
    "PiiRuleTimeout",
    "custom_matches",
    "rule_budget_s",
    "kinds",
    "placeholders",
    "redact",
    "use_custom_kinds",
]

# Order is the tie-break priority: earlier = stronger validation.
KINDS: tuple[str, ...] = ("id_number", "bank_card", "email", "phone", "address")
PLACEHOLDERS: dict[str, str] = {
    "phone": "[PHONE]",
    "id_number": "[ID_NUMBER]",
    "bank_card": "[BANK_CARD]",
    "email": "[EMAIL]",
    "address": "[ADDRESS]",
}
_PRIORITY = {kind: rank for rank, kind in enumerate(KINDS)}


@dataclass(frozen=True, slots=True)
class CustomKind:
    """An organisation's own kind: a compiled pattern and its placeholder (``sovereign.pii_rules`` checks both)."""

    kind: str
    regex: regex.Pattern[str]
    placeholder: str
    # Not glued to an ASCII letter or digit before, nor continuing a code through a separator ("X-", "2023-"), as
    # the built-in kinds: the regex holds the check after the match; the one before is made in `custom_matches`,
    # because a pattern that starts with a look-behind loses the engine's skip to its first character (measured on a
    # 600-character prompt: three kinds added 42-92 µs with the look-behind, 0-24 µs without).
    whole_word: bool = False

    @classmethod
    def compile(cls, kind: str, pattern: str, placeholder: str, *, ignore_case: bool = False,
                whole_word: bool = True) -> CustomKind:
        source = f"(?:{pattern}){_NA}" if whole_word else pattern
        flags = regex.V0 | (regex.IGNORECASE if ignore_case else 0)  # V0: the `re` module's syntax and semantics
        return cls(kind, regex.compile(source, flags), placeholder, whole_word)


class PiiRuleTimeout(SovereignError):
    """An organisation's pattern ran past its time budget on a text, which therefore was not checked."""

    code = "pii_rule_timeout"

    def __init__(self, kind: str, chars: int, budget_s: float) -> None:
        super().__init__(f"the PII rule {kind!r} took longer than {budget_s * 1000:.0f} ms on a {chars:,}-character "
                         f"text, so the text was not checked: its pattern backtracks catastrophically; rewrite it "
                         f"without nested or overlapping repetition ('(a+)+', '(a|ab)*')")
        self.kind = kind


def rule_budget_s(chars: int) -> float:
    """How long one organisation's pattern may take on a text: 50 ms, and 1 ms more per 10,000 characters, far above
    what a sound pattern needs (µs on a prompt) and far below a stalled gateway."""
    return 0.05 + chars / 10_000_000


_custom: tuple[CustomKind, ...] = ()
_all_kinds: frozenset[str] = frozenset(KINDS)
_placeholders: dict[str, str] = dict(PLACEHOLDERS)
_priority: dict[str, int] = dict(_PRIORITY)


def use_custom_kinds(custom: Iterable[CustomKind]) -> tuple[CustomKind, ...]:
    """Find these kinds from now on, besides the built-in ones (replacing any installed before); returns those."""
    global _custom, _all_kinds, _placeholders, _priority
    previous, new = _custom, tuple(custom)
    _custom = new
    _all_kinds = frozenset(KINDS) | {c.kind for c in new}
    _placeholders = {**PLACEHOLDERS, **{c.kind: c.placeholder for c in new}}
    _priority = {**_PRIORITY, **{c.kind: rank - len(new) for rank, c in enumerate(new)}}
    return previous


def kinds() -> tuple[str, ...]:
    """Every kind found now: the organisation's own first, then the built-in ones."""
    return (*(c.kind for c in _custom), *KINDS)


def placeholders() -> dict[str, str]:
    """The placeholder of every kind found now."""
    return dict(_placeholders)


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One piece of PII: its kind, where it is (``text[start:end]``) and the matched text itself."""

    kind: str
    start: int
    end: int
    text: str

    @property
    def placeholder(self) -> str:
        return _placeholders[self.kind]


# --- checksums -------------------------------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# GB/T 2260 province-level codes (first two digits of an ID number).
_ID_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82 83 91"
    .split()
)
_ID_MIN_YEAR = 1900


def id_check_char(first17: str) -> str:
    """The GB 11643 (ISO 7064 MOD 11-2) check character for the first 17 digits of an ID number."""
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def id_number_valid(value: str) -> bool:
    """True for an 18-character ID number with a known province, a real past birth date and a correct check char."""
    if len(value) != 18 or not value[:17].isdigit() or not value[:17].isascii():
        return False
    if value[:2] not in _ID_PROVINCES:
        return False
    try:
        born = _dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if born.year < _ID_MIN_YEAR or born > _dt.date.today():
        return False
    return id_check_char(value[:17]) == value[17].upper()


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = ord(ch) - 48
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    """True when a string of ASCII digits passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(digits: str) -> bool:
    n = len(digits)
    first = digits[0]
    if first == "4":  # Visa
        return n in (13, 16, 19)
    if first == "3":
        two = digits[:2]
        if two in ("34", "37"):  # Amex
            return n == 15
        if two == "35":  # JCB
            return 16 <= n <= 19
        if two in ("30", "36", "38", "39"):  # Diners
            return 14 <= n <= 19
        return False
    if first == "5":  # Mastercard 51-55, Maestro 50/56-59
        return 16 <= n <= 19
    if first == "2":  # Mastercard 2-series
        return n == 16 and 2221 <= int(digits[:4]) <= 2720
    if first == "6":  # UnionPay 62, Discover 60/64/65, Maestro 6x
        return 16 <= n <= 19
    if digits[:2] == "95":  # Chinese domestic debit cards (9558..., 9559...)
        return 16 <= n <= 19
    return False


def bank_card_valid(value: str) -> bool:
    """True for 13-19 digits (spaces/dashes ignored) with a card-network prefix that pass Luhn."""
    digits = value.replace(" ", "").replace("-", "")
    if not (13 <= len(digits) <= 19 and digits.isdigit() and digits.isascii()):
        return False
    return _card_prefix_ok(digits) and luhn_valid(digits)


# --- patterns --------------------------------------------------------------------------------------------------------
#
# Every pattern starts with a character class and only then looks behind (the lookbehind spans the consumed first
# character too: `(?<![0-9A-Za-z_].)`). Python's regex engine can then skip ahead to candidate first characters in C
# instead of evaluating the lookbehind at every position; that is 3-10x faster on ordinary text.


def _nb(consumed: int) -> str:
    """After `consumed` characters: the match is not glued to an ASCII letter/digit, nor to a code continuing
    through a separator ("SKU-", "2023-")."""
    return rf"(?<![0-9A-Za-z_].{{{consumed}}})(?<![0-9A-Za-z][-/.].{{{consumed}}})"


_NA = r"(?![0-9A-Za-z_])(?![-/.][0-9])"  # the same after the last character

_ID_RE = re.compile(
    r"[1-9][0-9]{5}(?<![0-9].{6}) ?(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01]) ?[0-9]{3}[0-9Xx]"
    r"(?![0-9Xx])"
)

_CARD_RE = re.compile(
    r"[2-69][0-9]{3}" + _nb(4)
    + r"(?:[0-9]{9,15}"  # contiguous
    + r"|([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}(?:\1[0-9]{1,3})?"  # 4-4-4-4(-3)
    + r"|([ -])[0-9]{6}\2[0-9]{4,5}"  # Amex 4-6-5
    + r"|[0-9]{2}([ -])[0-9]{10,13})"  # 6-rest, as some Chinese banks print it
    + _NA
)

_EMAIL_RE = re.compile(
    r"[A-Za-z0-9_%+\-](?<![A-Za-z0-9._%+\-].)[A-Za-z0-9._%+\-]{0,63}@"
    r"[A-Za-z0-9][A-Za-z0-9\-]{0,62}(?:\.[A-Za-z0-9][A-Za-z0-9\-]{0,62})*\.[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)

_CN_MOBILE_TAIL = r"[ \-]?1[3-9][0-9][ \-]?[0-9]{4}[ \-]?[0-9]{4}" + _NA
# (pattern, fewest digits, most digits). Each pattern begins with one literal or class, never an alternation: the
# regex engine only skips ahead in C to where a match can start when it knows the first character, and a leading
# alternation costs 4-10x. So alternatives are separate patterns.
_PHONE_RES: tuple[tuple[re.Pattern[str], int, int], ...] = (
    # Chinese mobile: 13812345678, 138-1234-5678, 138 1234 5678 (not "+138...": that is a country code)
    (re.compile(r"1[3-9][0-9](?<![+].{3})" + _nb(3) + r"[ \-]?[0-9]{4}[ \-]?[0-9]{4}" + _NA), 11, 11),
    # ... with a country prefix: +86 13812345678, 0086-138..., (+86)138...
    (re.compile(r"\+86(?<![0-9A-Za-z_+].{3})" + _CN_MOBILE_TAIL), 13, 13),
    (re.compile(r"0086(?<![0-9A-Za-z_+].{4})" + _CN_MOBILE_TAIL), 15, 15),
    (re.compile(r"\((?<![0-9A-Za-z_].)\+?86\)" + _CN_MOBILE_TAIL), 13, 13),
    # Chinese landline with an explicit area code: (0755)86013388, (021) 6123 4567, 010-65529988, 021-6123-4567
    (re.compile(r"\((?<![0-9A-Za-z_].)0(?:10|2[0-9]|[3-9][0-9]{2})\)[ \-]?[2-8][0-9]{2,3}[ \-]?[0-9]{4}" + _NA), 10, 12),
    (re.compile(r"0" + _nb(1) + r"(?:10|2[0-9]|[3-9][0-9]{2})-[2-8][0-9]{2,3}[ \-]?[0-9]{4}" + _NA), 10, 12),
    # UK-style national numbers written in groups: 020 7946 0958, 0161 496 0000, 07700 900123
    (re.compile(r"0[1-9]" + _nb(2) + r"[0-9]{1,3}(?: [0-9]{3,4} [0-9]{3,4}|(?<=07[0-9]{3}) [0-9]{6})" + _NA), 11, 12),
    # International with a leading +: +1 415-555-0132, +44 20 7946 0958, +49 (0)30 1234567. E.164 allows at most 15
    # digits; fewer than 8 is a short code, a score or an extension.
    (re.compile(
        r"\+(?<![0-9A-Za-z_+].)[1-9][0-9]{0,2}(?:[ .\-]?\(0\))?(?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})){2,5}" + _NA
    ), 8, 15),
    # North American without +, always with separators (a bare 10-digit run is an order number; "200 300 4000"
    # is three quantities): 415-555-0132, 415.555.0132, 1-800-555-0199, (415) 555-0132, 1 (800) 555 0199
    (re.compile(r"[2-9][0-9]{2}([.\-])" + _nb(4) + r"[2-9][0-9]{2}\1[0-9]{4}" + _NA), 10, 10),
    (re.compile(r"1([.\-])" + _nb(2) + r"[2-9][0-9]{2}\1[2-9][0-9]{2}\1[0-9]{4}" + _NA), 11, 11),
    (re.compile(r"1" + _nb(1) + r"[ .\-]?\([2-9][0-9]{2}\)[ \-]?[2-9][0-9]{2}[ .\-][0-9]{4}" + _NA), 11, 11),
    (re.compile(r"\((?<![0-9A-Za-z_].)[2-9][0-9]{2}\)[ \-]?[2-9][0-9]{2}[ .\-][0-9]{4}" + _NA), 10, 10),
)

# CJK characters that may be part of a place name. Function words and verbs that typically come right before an
# address ("我住在", "寄到", "收货地址是") are left out so the match does not swallow the sentence. Characters that
# also occur in place names (成都, 石家庄, 和平区, 从化, 即墨, 那曲, 来宾, 自贡, 于洪) must not be in this list.
_CJK_STOP = "的是在到我你他她它们住址寄送往与及请把给了为由去至向对就也还要被让叫您这此该位处收货过电话码号、"


def _cjk_name_class() -> str:
    stops = sorted({ord(c) for c in _CJK_STOP})
    parts: list[str] = []
    lo = 0x4E00
    for cp in stops:
        if cp > lo:
            parts.append(f"\\u{lo:04x}-\\u{cp - 1:04x}")
        lo = cp + 1
    parts.append(f"\\u{lo:04x}-\\u9fff")
    return "[" + "".join(parts) + "]"


_N = _cjk_name_class()
_CN_NUM = "[0-9]{1,5}|[一二三四五六七八九十百零〇]{1,6}"
# A Chinese address is found from its core, the road suffix and house number ("路88号"), which is rare in text; only
# then is the place-name chain before it matched, inside a short window that must end where the core begins.
# "道" is a road in Hong Kong and Taiwan (弥敦道) but also ends many words (知道, 频道, 通道), which are excluded.
# Cores start with one character class (the last character of the suffix: 路 街 道 巷 同 for roads, 区 园 寓 厦 村 苑
# for estates) so the regex engine can skip ahead to them; the rest of the suffix is checked behind.
_CN_ROAD_END = "[路街道巷同](?<![知报味频通渠管轨隧跑车人难一说问答笑叫喊写顺绕航坡栈步古隔]道)(?<![^胡]同)"
_CN_BUILDING = "大厦|广场|中心|花园|小区|公寓|大楼|家园|新村|苑|园|府|城"
_CN_UNIT = "[0-9A-Za-z一二三四五六七八九十]{1,5}(?:号楼|栋|幢|座|单元|层|楼|室|号|户)"
_CN_CORE_RES = (
    # road and house number: 建国路88号, 深南大道10000号, 南京东路100弄5号, 信义路五段7号, then 华星时代广场A座1201室
    re.compile(
        rf"{_CN_ROAD_END}(?:(?:{_CN_NUM})段)?(?:(?:{_CN_NUM})(?:弄|巷))?[甲乙丙丁]?(?:{_CN_NUM})[号號](?!线)"
        rf"(?:{_N}{{1,10}}?(?:{_CN_BUILDING})|院)?(?:{_CN_UNIT}){{0,4}}"
    ),
    # a housing estate with at least two unit parts: 阳光花园3栋2单元501室
    re.compile(rf"[区园寓厦村苑](?:(?<=小区|花园|公寓|大厦|家园|新村)|(?<=苑))(?:{_CN_UNIT}){{2,4}}"),
)
_CN_PLACE_RE = re.compile(
    rf"(?:{_N}{{2,6}}?(?:省|自治区|特别行政区))?"
    rf"(?:{_N}{{1,6}}?(?:市|州|盟))?"
    rf"(?:{_N}{{1,5}}?(?:区|县|旗))?"
    rf"(?:{_N}{{1,6}}?(?:镇|乡|街道))?"
    rf"{_N}{{2,8}}\Z"
)
_CN_PLACE_WINDOW = 40

# Full words, then abbreviations that may carry a dot ("Baker St."); a full word never eats the sentence's full stop.
_EN_SUFFIX = (
    "Street|Avenue|Road|Boulevard|Lane|Drive|Court|Place|Terrace|Way|Square|Parkway|Highway|Crescent|Close|Gardens|"
    "Row|Mews|(?:St|Ave|Rd|Blvd|Ln|Dr|Ct|Pl|Sq|Pkwy|Hwy)\\.?"
)
_EN_ADDR_RE = re.compile(
    r"[0-9](?<![0-9A-Za-z_.,$€£¥].)[0-9]{0,4}[A-Za-z]?(?:-[0-9]{1,5})? {1,2}"
    r"(?!The |A |An )(?:(?:[A-Z][A-Za-z'\-]*|[0-9]{1,3}(?:st|nd|rd|th))\.? {1,2}){1,4}"
    rf"(?:{_EN_SUFFIX})(?![A-Za-z])"
    r"(?: (?:N|S|E|W|NE|NW|SE|SW)(?![A-Za-z]))?"
    r"(?:,? (?:Apt|Apartment|Suite|Ste|Unit|Flat|Room|Floor)\.? ?#?[0-9A-Za-z\-]{1,6})?"
    r"(?:, ?[A-Z][A-Za-z]+(?: [A-Z][A-Za-z]+){0,2},? "
    r"(?:[A-Z]{2} [0-9]{5}(?:-[0-9]{4})?|[A-Z]{1,2}[0-9][A-Z0-9]? [0-9][A-Z]{2}))?"
)

# Cheap guards so text without digits / '@' / house-number characters skips whole groups of patterns.
_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_CN_HOUSE = re.compile(r"[号號栋幢室]")

# Full-width forms that people type in Chinese text, folded one-to-one so offsets stay valid. Only text with a
# full-width digit or @ pays for the fold (full-width commas and brackets alone change nothing we look for).
# Full-width commas stay as they are: folded, "，221B Baker Street" would read as a thousands separator.
_FOLD = str.maketrans(
    {
        **{0xFF10 + i: 0x30 + i for i in range(10)},  # digits
        **{0xFF21 + i: 0x41 + i for i in range(26)},  # A-Z
        **{0xFF41 + i: 0x61 + i for i in range(26)},  # a-z
        0xFF0B: "+", 0xFF0D: "-", 0xFF08: "(", 0xFF09: ")", 0xFF20: "@", 0xFF0E: ".", 0xFF3F: "_", 0x3000: " ",
    }
)
_HAS_FULLWIDTH = re.compile(r"[\uff10-\uff19\uff20]")

_Candidate = tuple[int, int, str]  # start, end, kind


def _candidates(text: str, kinds: frozenset[str]) -> list[_Candidate]:
    """Every validated match of every wanted kind; they may overlap."""
    out: list[_Candidate] = []
    # Phones, IDs and cards all hold at least 8 digits bridged by separators: text without such a run (most chat
    # text: no digits, or only prices, dates and counts) skips all their patterns after one cheap search.
    if kinds & _DIGIT_KINDS and _DIGIT_CLUSTER_RE.search(text) is not None:
        for kind, pattern, valid in _DIGIT_PATTERNS:
            if kind in kinds:
                for m in pattern.finditer(text):
                    if valid(m.group()):
                        out.append((m.start(), m.end(), kind))
    if "address" in kinds:
        if _HAS_DIGIT.search(text) is not None:
            out.extend((m.start(), m.end(), "address") for m in _EN_ADDR_RE.finditer(text))
        if _HAS_CN_HOUSE.search(text) is not None:  # Chinese house numbers may be written in hanzi
            for core_re in _CN_CORE_RES:
                for core in core_re.finditer(text):
                    # the place name runs up to the suffix's last character ("深南大" + "道")
                    place = _CN_PLACE_RE.search(text, max(0, core.start() - _CN_PLACE_WINDOW), core.start())
                    if place is not None:
                        out.append((place.start(), core.end(), "address"))
    if "email" in kinds and "@" in text:
        out.extend((m.start(), m.end(), "email") for m in _EMAIL_RE.finditer(text))
    for custom in _custom:
        if custom.kind in kinds:
            out.extend(custom_matches(custom, text))
    return out


def custom_matches(custom: CustomKind, text: str, budget_s: float | None = None) -> list[tuple[int, int, str]]:
    """Where `custom` matches in `text`, overlaps with other kinds left in: (start, end, kind). PiiRuleTimeout past
    `budget_s` (default `rule_budget_s(len(text))`)."""
    out: list[_Candidate] = []
    budget_s = rule_budget_s(len(text)) if budget_s is None else budget_s
    deadline, pos = time.perf_counter() + budget_s, 0
    try:
        while True:  # one finditer per text: the engine's time check costs ~3 µs a call, not per match
            for m in custom.regex.finditer(text, pos, timeout=max(deadline - time.perf_counter(), 1e-6)):
                s, e = m.span()
                if custom.whole_word and s > 0 and (text[s - 1] in _ALNUM or (
                        text[s - 1] in _SEPARATORS and s > 1 and text[s - 2] in _ALNUM)):
                    pos = s + 1  # a match further in may still stand on its own
                    break
                if e > s:
                    out.append((s, e, custom.kind))
            else:
                return out
    except TimeoutError:
        raise PiiRuleTimeout(custom.kind, len(text), budget_s) from None


def _digit_count(value: str) -> int:
    # "(0)" is the trunk prefix in "+49 (0)30 ...": written, never dialled after a country code.
    return sum(ch.isdigit() for ch in value.replace("(0)", ""))


# ITU-T E.164 country codes in use: "+" and digits that start with none of them ("+2147483647", the int32 maximum in
# a table) are not a phone number.
_CC1 = frozenset("17")
_CC2 = frozenset(
    "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62 63 64 65 66 81 82 84 86 "
    "90 91 92 93 94 95 98".split()
)
_CC3 = frozenset(
    [str(n) for n in (211, 212, 213, 216, 218, 290, 291, 297, 298, 299, 420, 421, 423, 800, 808, 850, 852, 853, 855,
                      856, 870, 878, 880, 886)]
    + [str(n) for lo, hi in ((220, 269), (350, 359), (370, 389), (500, 509), (590, 599), (670, 692), (881, 883),
                             (960, 968), (970, 979), (992, 998)) for n in range(lo, hi + 1)]
)


def _country_code_ok(value: str) -> bool:
    head = "".join(ch for ch in value[:8] if ch.isdigit())[:3]
    return head[:1] in _CC1 or head[:2] in _CC2 or head in _CC3


def _phone_check(fewest: int, most: int) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        if not fewest <= _digit_count(value) <= most:
            return False
        return not value.startswith("+") or _country_code_ok(value[1:])

    return check


# At least 8 digits, each pair at most 3 separators apart ("+49 (0) (30)" is the widest gap a phone pattern allows);
# the date "2023-10-15" is one, "¥1,299.00" is not.
_DIGIT_CLUSTER_RE = re.compile(r"[0-9](?:[ ()+.\-]{0,3}[0-9]){7,}")
_DIGIT_KINDS = frozenset({"id_number", "bank_card", "phone"})
_DIGIT_PATTERNS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool]], ...] = (
    ("id_number", _ID_RE, lambda value: id_number_valid(value.replace(" ", ""))),
    ("bank_card", _CARD_RE, bank_card_valid),
    *(("phone", pattern, _phone_check(fewest, most)) for pattern, fewest, most in _PHONE_RES),
)


def _resolve(cands: list[_Candidate]) -> list[_Candidate]:
    """Keep non-overlapping candidates: longer first, then stronger kind, then earlier."""
    if len(cands) <= 1:
        return cands
    cands.sort(key=lambda c: (c[0] - c[1], _priority[c[2]], c[0]))
    kept: list[_Candidate] = []  # sorted by start, non-overlapping
    starts: list[int] = []
    for cand in cands:
        s, e, _ = cand
        i = bisect.bisect_right(starts, s)
        if (i > 0 and kept[i - 1][1] > s) or (i < len(kept) and kept[i][0] < e):
            continue
        kept.insert(i, cand)
        starts.insert(i, s)
    return kept


def _mask(text: str, spans: list[_Candidate]) -> str:
    parts: list[str] = []
    pos = 0
    for s, e, _ in spans:
        parts.append(text[pos:s])
        parts.append("[" + "\0" * (e - s - 2) + "]")
        pos = e
    parts.append(text[pos:])
    return "".join(parts)


_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_GLUE_AFTER = _ALNUM | frozenset("+(@%")
_GLUE_BEFORE = _ALNUM | frozenset(".%+-/")
_SEPARATORS = frozenset("-/.")


def _glued(text: str, spans: list[_Candidate]) -> bool:
    """Whether a neighbour of some match touches it closely enough that a look-around may have hidden it."""
    n = len(text)
    for s, e, _ in spans:
        if e < n and (
            text[e] in _GLUE_AFTER or (text[e] in _SEPARATORS and e + 1 < n and text[e + 1] in _ALNUM)
        ):
            return True
        if s > 0 and text[s - 1] in _GLUE_BEFORE:
            return True
    return False


def _kindset(wanted: Iterable[str] | None) -> frozenset[str]:
    if wanted is None:
        return _all_kinds
    chosen = frozenset(wanted)
    unknown = chosen - _all_kinds
    if unknown:
        raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; known kinds are {list(kinds())}")
    return chosen


def _require_str(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"PII scanning needs text (str), got {type(text).__name__}")


def find_pii(text: str, *, kinds: Iterable[str] | None = None) -> list[PiiMatch]:
    """All PII in ``text``, non-overlapping and sorted by position; ``kinds`` limits the search to some kinds."""
    _require_str(text)
    if not text:
        return []
    wanted = _kindset(kinds)
    scan = text.translate(_FOLD) if _HAS_FULLWIDTH.search(text) else text
    cands = _candidates(scan, wanted)
    found = new = _resolve(cands)
    # A value glued to a match ("110101199003074514+44 20 7946 0958") is hidden by the look-arounds until the match
    # becomes a placeholder, and so is what is left of a value that lost an overlap ("+44 20 7946" of
    # "+44 20 7946 0958.a.b@example.com", whose last digits went to the longer e-mail). Mask the matches the way a
    # placeholder would ("[" ... "]", same length so offsets hold) and look again, so that redact() is idempotent.
    # Only text where something touches or overlaps a match pays for it.
    while new and (len(new) < len(cands) or _glued(scan, new)):
        scan = _mask(scan, new)
        cands = _candidates(scan, wanted)
        new = _resolve(cands)
        found = sorted(found + new)
    return [PiiMatch(kind, s, e, text[s:e]) for s, e, kind in found]


def redact(text: str, *, kinds: Iterable[str] | None = None) -> tuple[str, dict[str, int]]:
    """``text`` with each PII match replaced by its placeholder, and how many of each kind (every kind, zeros too)."""
    names = _placeholders
    counts = dict.fromkeys(names, 0)
    matches = find_pii(text, kinds=kinds)
    if not matches:
        return text, counts
    parts: list[str] = []
    pos = 0
    for m in matches:
        parts.append(text[pos : m.start])
        parts.append(names[m.kind])
        counts[m.kind] += 1
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts), counts


def contains_pii(text: str, *, kinds: Iterable[str] | None = None) -> bool:
    """True when ``text`` holds any PII (of ``kinds``, if given)."""
    _require_str(text)
    if not text:
        return False
    scan = text.translate(_FOLD) if _HAS_FULLWIDTH.search(text) else text
    return bool(_candidates(scan, _kindset(kinds)))  # every candidate is validated: no need to resolve overlaps
