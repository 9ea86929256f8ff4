"""The shared PII module: what it finds, what it must leave alone, and what redaction guarantees."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign.pii import (
    KINDS,
    PLACEHOLDERS,
    PiiMatch,
    bank_card_valid,
    contains_pii,
    find_pii,
    id_check_char,
    id_number_valid,
    luhn_check_digit,
    luhn_valid,
    redact,
)


def kinds_found(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(text)]


# --- phone -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("我的手机是13812345678，请联系", "13812345678"),
        ("电话：138-1234-5678。", "138-1234-5678"),
        ("手机 139 1234 5678 随时打", "139 1234 5678"),
        ("请拨打+86 13912345678咨询", "+86 13912345678"),
        ("联系0086-15012345678", "0086-15012345678"),
        ("(+86)18612345678", "(+86)18612345678"),
        ("客服电话010-65529988", "010-65529988"),
        ("深圳办公室(0755)86013388", "(0755)86013388"),
        ("Call me on +1 415-555-0132 tomorrow.", "+1 415-555-0132"),
        ("Office: (415) 555-0132.", "(415) 555-0132"),
        ("Phone 415.555.0132 or", "415.555.0132"),
        ("toll free 1-800-555-0199", "1-800-555-0199"),
        ("London +44 20 7946 0958", "+44 20 7946 0958"),
        ("Berlin +49 (0)30 1234567", "+49 (0)30 1234567"),
        ("全角手机１３８１２３４５６７８好", "１３８１２３４５６７８"),
        ("+86 10 6552 9988 总机", "+86 10 6552 9988"),
        ("HK +852 2345 6789", "+852 2345 6789"),
        ("Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
        ("UK 020 7946 0958 (London)", "020 7946 0958"),
        ("mobile 07700 900123", "07700 900123"),
        ("Tel: 021-6123-4567 ext. 123", "021-6123-4567"),
        ("传真 (010) 6552-9988", "(010) 6552-9988"),
        ("上海总部 (021) 6123 4567", "(021) 6123 4567"),
        ("US 1 (800) 555 0199 free", "1 (800) 555 0199"),
    ],
)
def test_phone_numbers_are_found_in_both_languages(text: str, number: str) -> None:
    assert kinds_found(text) == [("phone", number)]


@pytest.mark.parametrize(
    "text",
    [
        "订单号12345678901已发货",  # 11 digits but not a mobile prefix
        "order 20231015123 shipped",
        "tracking SF1381234567801",  # letters glued on: a waybill, not a phone
        "价格 1299.00 元，数量 3",
        "日期 2023-10-15 12:30",
        "version 1.13.8 build 5678",
        "score +5 10 20",
        "IP 192.168.100.200",
        "ISBN 978-7-115-12345-6",
        "138123456789 is twelve digits",
        "年份 2021 2022 2023",
        "code 0123 456 789",
        "微信 wxid_13812345678",
        "版本 v13.8.12345678",
        "call 911 or 112",
        "Call 555-0132",
        "stock levels 250 350 1200 this week",
        "mixed 415-555.0132 separators",
        "int32 range -2147483648 to +2147483647",
    ],
)
def test_numbers_that_are_not_phones_are_left_alone(text: str) -> None:
    assert find_pii(text) == []


# --- ID numbers ------------------------------------------------------------------------------------------------------


def test_id_number_checksum_examples() -> None:
    assert id_check_char("11010519491231002") == "X"
    assert id_number_valid("11010519491231002X")
    assert id_number_valid("11010519491231002x")
    assert id_number_valid("110101199003074514")
    assert not id_number_valid("110101199003074515")  # bad check digit
    assert not id_number_valid("110101199002304514")  # 30 February
    assert not id_number_valid("990101199003074514")  # no province 99
    assert not id_number_valid("11010118990307451X")  # born before 1900


def test_id_number_with_future_birth_date_is_rejected() -> None:
    future = dt.date.today().year + 1
    first17 = f"110101{future}0101001"
    assert not id_number_valid(first17 + id_check_char(first17))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("身份证号110101199003074514，请核对", "110101199003074514"),
        ("身份证：11010519491231002X。", "11010519491231002X"),
        ("ID card 11010519491231002x on file", "11010519491231002x"),
        ("证件 110101 19900307 4514 已登记", "110101 19900307 4514"),
        ("身份证号１１０１０１１９９００３０７４５１４", "１１０１０１１９９００３０７４５１４"),
    ],
)
def test_valid_id_numbers_are_found(text: str, number: str) -> None:
    assert kinds_found(text) == [("id_number", number)]


@pytest.mark.parametrize(
    "text",
    [
        "身份证号110101199003074515",  # checksum off by one
        "身份证号110101199013074514",  # month 13
        "编号1101011990030745141",  # 19 digits
        "流水号 110101199003074514X",  # one character too many
    ],
)
def test_invalid_id_numbers_are_not_flagged(text: str) -> None:
    assert [m for m in find_pii(text) if m.kind == "id_number"] == []


def test_id_number_that_passes_luhn_is_counted_once_as_id() -> None:
    number = next(n for n in _ids_with_luhn() if luhn_valid(n))
    _, counts = redact(f"身份证 {number}")
    assert counts["id_number"] == 1 and counts["bank_card"] == 0


def _ids_with_luhn():
    for seq in range(1000):
        first17 = f"61010119850101{seq:03d}"
        yield first17 + id_check_char(first17)


# --- bank cards ------------------------------------------------------------------------------------------------------


def test_luhn_helpers_agree() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert luhn_check_digit("411111111111111") == "1"
    assert luhn_check_digit("622202123456789012") + "" in "0123456789"
    assert bank_card_valid("6222 0212 3456 7890 12" + luhn_check_digit("622202123456789012"))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("卡号 4111 1111 1111 1111 已绑定", "4111 1111 1111 1111"),
        ("卡号4111-1111-1111-1111", "4111-1111-1111-1111"),
        ("UnionPay 6222021234567890128 ok", "6222021234567890128"),
        ("Amex 3782 822463 10005.", "3782 822463 10005"),
        ("Mastercard 5500000000000004", "5500000000000004"),
        ("工行卡6212 2617 0200 1234 566，谢谢", "6212 2617 0200 1234 566"),
    ],
)
def test_valid_bank_cards_are_found(text: str, number: str) -> None:
    assert bank_card_valid(number)
    assert kinds_found(text) == [("bank_card", number)]


@pytest.mark.parametrize(
    "text",
    [
        "卡号 4111 1111 1111 1112",  # fails Luhn
        "订单号 2023101512345674 已付款",  # passes Luhn, but an order number starting with a year
        "商品编码 7311 2345 6789 0127",  # passes Luhn, no card network starts with 7
        "金额 1234567890123.45 元",
        "SKU4111111111111111X",
        "batch 2023-4111111111111111",
    ],
)
def test_numbers_that_are_not_cards_are_left_alone(text: str) -> None:
    assert [m for m in find_pii(text) if m.kind == "bank_card"] == []


def test_order_number_passing_luhn_is_still_not_a_card() -> None:
    assert luhn_valid("2023101512345674") and not bank_card_valid("2023101512345674")


# --- e-mail ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("邮箱zhang.san@example.com.cn联系我", "zhang.san@example.com.cn"),
        ("Write to john.doe+sales@corp-mail.io, thanks", "john.doe+sales@corp-mail.io"),
        ("<ops_team@sub.domain.org>", "ops_team@sub.domain.org"),
        ("QQ邮箱 123456789@qq.com。", "123456789@qq.com"),
        ("全角 user＠example．com 号", "user＠example．com"),
    ],
)
def test_email_addresses_are_found(text: str, address: str) -> None:
    assert kinds_found(text) == [("email", address)]


@pytest.mark.parametrize("text", ["handle @someone on chat", "a@b", "price@ 3", "x@localhost", "me@example.c"])
def test_not_emails_are_left_alone(text: str) -> None:
    assert find_pii(text) == []


def test_email_containing_a_phone_is_one_email() -> None:
    assert kinds_found("发到13812345678@163.com") == [("email", "13812345678@163.com")]


# --- addresses -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("我的地址是北京市朝阳区建国路88号，谢谢", "北京市朝阳区建国路88号"),
        ("寄到上海市黄浦区南京东路100弄5号3号楼2单元501室。", "上海市黄浦区南京东路100弄5号3号楼2单元501室"),
        ("收货地址：广东省深圳市南山区深南大道10000号", "广东省深圳市南山区深南大道10000号"),
        ("住在北京市东城区东四十条胡同八号", "北京市东城区东四十条胡同八号"),
        ("He lives at 221B Baker Street, London NW1 6XE.", "221B Baker Street, London NW1 6XE"),
        (
            "Send it to 1600 Pennsylvania Avenue NW, Washington, DC 20500 today",
            "1600 Pennsylvania Avenue NW, Washington, DC 20500",
        ),
        ("Ship to 42 Wallaby Way, Sydney please", "42 Wallaby Way"),
        ("Office at 350 5th Avenue, Suite 3300", "350 5th Avenue, Suite 3300"),
        ("我住在杭州市西湖区文三路478号华星时代广场A座1201室。", "杭州市西湖区文三路478号华星时代广场A座1201室"),
        ("北京市海淀区中关村大街1号院2号楼3单元401室", "北京市海淀区中关村大街1号院2号楼3单元401室"),
        ("香港九龙弥敦道100号", "香港九龙弥敦道100号"),
        ("台北市信义区信义路五段7号", "台北市信义区信义路五段7号"),
        ("我住在阳光花园3栋2单元501室，周末在家", "阳光花园3栋2单元501室"),
        ("收货地址是四川省成都市武侯区人民南路575号20栋2406室。", "四川省成都市武侯区人民南路575号20栋2406室"),
        ("寄往河北省石家庄市长安区中山东路10号", "河北省石家庄市长安区中山东路10号"),
        ("天津市和平区南京路189号", "天津市和平区南京路189号"),
        ("Room 101, 2 Main St., Springfield, IL 62704", "2 Main St., Springfield, IL 62704"),
    ],
)
def test_street_addresses_are_found(text: str, address: str) -> None:
    assert kinds_found(text) == [("address", address)]


@pytest.mark.parametrize(
    "text",
    [
        "请坐地铁10号线到建国门站",
        "明天3号发货，思路很清晰",
        "I bought 3 Green apples on Main",
        "Chapter 5 The Long Way home",
        "We shipped 500 units to the street vendors",
        "我知道3号会议室在哪",
        "老师知道3号会议室",
        "小区3号楼和5号楼都停电了",
        "请到人民路口等我",
        "明天下午3点在南京路步行街见",
        "The meeting is at 10 Central Park",
    ],
)
def test_text_that_only_looks_like_an_address_is_left_alone(text: str) -> None:
    assert find_pii(text) == []


# Everyday customer-service and sales text full of numbers that are not personal data.
NOT_PII = [
    "订单号：202311151234567890 已发货",
    "运单号 SF1234567890123",
    "快递单号 YT6912345678901 请查收",
    "发票号码 04400190011112345678",
    "价格：¥12,999.00，优惠后 ¥11,999",
    "时间 2023-11-15 14:30:00，时间戳 1700000000000",
    "UUID 123e4567-e89b-12d3-a456-426614174000",
    "型号 SM-G9980 IMEI 356938035643809",
    "身份证尾号4514，邮编 100022",
    "坐标 39.9042, 116.4074",
    "Invoice INV-2023-0001234 total $1,234.56",
    "Serial 4111-1111-1111-1111-000",
    "ISBN 978-0-306-40615-7",
    "The year 1999 2000 2001 2002 2003",
    "Quote Q-2024-000123: 25 seats x $49.00/month, 12 months, 15% discount",
    "退货政策：签收后7天内可无理由退货，15天内质量问题可换货。",
    "mail: support@公司.中国",
    "@username and email@domain",
]


@pytest.mark.parametrize("text", NOT_PII)
def test_everyday_business_numbers_are_not_pii(text: str) -> None:
    assert find_pii(text) == []


# --- redaction -------------------------------------------------------------------------------------------------------

MIXED = (
    "客户张三，手机13812345678，身份证110101199003074514，银行卡6222021234567890128，"
    "email zhang.san@example.com, address 北京市朝阳区建国路88号; US office +1 415-555-0132, 221B Baker Street."
)


def test_redact_replaces_each_kind_with_its_placeholder_and_counts_it() -> None:
    out, counts = redact(MIXED)
    assert out == (
        "客户张三，手机[PHONE]，身份证[ID_NUMBER]，银行卡[BANK_CARD]，"
        "email [EMAIL], address [ADDRESS]; US office [PHONE], [ADDRESS]."
    )
    assert counts == {"phone": 2, "id_number": 1, "bank_card": 1, "email": 1, "address": 2}


def test_redact_without_pii_returns_text_and_zero_counts() -> None:
    text = "订单 2023-10-15 金额 ¥1299.00，SKU AB-1234，谢谢"
    assert redact(text) == (text, dict.fromkeys(PLACEHOLDERS, 0))
    assert redact("") == ("", dict.fromkeys(PLACEHOLDERS, 0))
    assert not contains_pii(text)


def test_redact_is_idempotent() -> None:
    once, _ = redact(MIXED)
    twice, counts = redact(once)
    assert twice == once and sum(counts.values()) == 0


def test_matches_are_sorted_non_overlapping_and_index_the_text() -> None:
    matches = find_pii(MIXED)
    assert all(isinstance(m, PiiMatch) for m in matches)
    assert all(MIXED[m.start : m.end] == m.text for m in matches)
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:]))


def test_kinds_limit_the_search_and_unknown_kinds_are_refused() -> None:
    assert {m.kind for m in find_pii(MIXED, kinds=["email"])} == {"email"}
    assert contains_pii(MIXED, kinds={"bank_card"})
    assert not contains_pii("mail me: a@b.com", kinds=["phone"])
    with pytest.raises(ValueError, match="passport"):
        find_pii(MIXED, kinds=["passport"])


@pytest.mark.parametrize("fn", [find_pii, redact, contains_pii])
def test_non_text_input_is_refused_clearly(fn) -> None:
    with pytest.raises(TypeError, match="needs text"):
        fn(b"13812345678")


def test_placeholders_cover_every_kind() -> None:
    assert set(PLACEHOLDERS) == set(KINDS)
    assert [m.placeholder for m in find_pii("a@b.com 13812345678")] == ["[EMAIL]", "[PHONE]"]


def test_full_width_forms_are_found_and_offsets_index_the_original() -> None:
    text = "证件号１１０１０５１９４９１２３１００２Ｘ，邮箱ａｂ＠ｅｘａｍｐｌｅ．ｃｏｍ"
    matches = find_pii(text)
    assert [(m.kind, text[m.start : m.end]) for m in matches] == [
        ("id_number", "１１０１０５１９４９１２３１００２Ｘ"),
        ("email", "ａｂ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    ]


def test_value_glued_to_another_match_is_found_on_the_second_look() -> None:
    out, counts = redact("110101199003074514+44 20 7946 0958")
    assert out == "[ID_NUMBER][PHONE]" and counts["id_number"] == 1 and counts["phone"] == 1


def test_what_is_left_of_a_value_that_lost_an_overlap_is_redacted_too() -> None:
    """The e-mail takes the phone's last digits (the longer match wins); the rest of the phone must not stay."""
    out, counts = redact("+44 20 7946 0958.a.b@example.com")
    assert out == "[PHONE] [EMAIL]" and counts["phone"] == 1 and counts["email"] == 1
    assert redact(out) == (out, dict.fromkeys(counts, 0))


# --- properties ------------------------------------------------------------------------------------------------------

_PROVINCES = ["11", "12", "13", "31", "32", "33", "44", "51", "61", "65", "81", "91"]


@st.composite
def id_numbers(draw: st.DrawFn) -> str:
    province = draw(st.sampled_from(_PROVINCES))
    area = draw(st.integers(0, 9999))
    born = draw(st.dates(dt.date(1920, 1, 1), dt.date(2020, 12, 31)))
    seq = draw(st.integers(0, 999))
    first17 = f"{province}{area:04d}{born:%Y%m%d}{seq:03d}"
    return first17 + id_check_char(first17)


_CARD_SHAPES = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("35", 16),
                ("62", 16), ("62", 19), ("6011", 16), ("9558", 19)]


@st.composite
def bank_cards(draw: st.DrawFn) -> str:
    prefix, length = draw(st.sampled_from(_CARD_SHAPES))
    body = prefix + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=length - len(prefix) - 1,
                                          max_size=length - len(prefix) - 1)))
    digits = body + luhn_check_digit(body)
    if draw(st.booleans()) and length == 16:
        return " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    return digits


# Filler that cannot form PII on its own and cannot glue onto a planted value.
_FILLER = st.text(alphabet="abcdefxyz 你好请问订单退款客服谢谢，。！?:;()", max_size=40)
_SEP = st.sampled_from([" ", "，", "：", "号码", "\n", "("])


@settings(max_examples=100, deadline=None)
@given(before=_FILLER, sep1=_SEP, value=st.one_of(id_numbers(), bank_cards()), sep2=_SEP, after=_FILLER)
def test_valid_ids_and_cards_in_random_text_are_always_found(before: str, sep1: str, value: str, sep2: str,
                                                             after: str) -> None:
    text = before + sep1 + value + sep2 + after
    start = len(before) + len(sep1)
    found = [m for m in find_pii(text) if (m.start, m.end) == (start, start + len(value))]
    assert len(found) == 1
    assert found[0].kind == ("id_number" if id_number_valid(value) else "bank_card")


_ANY_TEXT = st.lists(
    st.one_of(
        st.text(alphabet="abcXYZ019 -+.@()你好路号市区，", max_size=12),
        id_numbers(),
        bank_cards(),
        st.sampled_from(["13812345678", "a.b@example.com", "北京市朝阳区建国路88号", "221B Baker Street",
                         "+44 20 7946 0958", "(415) 555-0132"]),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(_ANY_TEXT)
def test_redacted_text_never_contains_a_match_and_redacting_again_changes_nothing(text: str) -> None:
    matches = find_pii(text)
    out, counts = redact(text)
    assert sum(counts.values()) == len(matches)
    covered = [(m.start, m.end) for m in matches]
    for m in matches:
        # The same characters may also sit somewhere they are not PII (glued to other digits); only those may remain.
        size = len(m.text)
        elsewhere = [i for i in _occurrences(text, m.text) if not any(i < e and s < i + size for s, e in covered)]
        assert out.count(m.text) == len(elsewhere)
    again, counts_again = redact(out)
    assert again == out and sum(counts_again.values()) == 0


def _occurrences(text: str, part: str) -> list[int]:
    found, i = [], text.find(part)
    while i != -1:
        found.append(i)
        i = text.find(part, i + 1)
    return found


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_any_text_gives_consistent_spans_and_idempotent_redaction(text: str) -> None:
    matches = find_pii(text)
    assert all(text[m.start : m.end] == m.text for m in matches)
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:]))
    out, _ = redact(text)
    assert redact(out)[0] == out


@settings(max_examples=100, deadline=None)
@given(first17=st.from_regex(r"\A[1-9][0-9]{16}\Z"), bad=st.sampled_from("0123456789X"))
def test_eighteen_characters_with_a_wrong_check_char_are_never_an_id(first17: str, bad: str) -> None:
    if bad == id_check_char(first17):
        bad = "0" if bad != "0" else "1"
    assert [m for m in find_pii(f"身份证 {first17}{bad} 号") if m.kind == "id_number"] == []


@settings(max_examples=100, deadline=None)
@given(digits=st.from_regex(r"\A[0-9]{13,19}\Z"))
def test_digit_runs_failing_luhn_are_never_a_card(digits: str) -> None:
    if luhn_valid(digits):
        digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    assert [m for m in find_pii(f"卡号 {digits} ok") if m.kind == "bank_card"] == []


@settings(max_examples=100, deadline=None)
@given(
    before=_FILLER,
    number=st.from_regex(r"\A1[3-9][0-9]{9}\Z"),
    style=st.sampled_from(
        ["{a}{b}{c}", "{a} {b} {c}", "{a}-{b}-{c}", "+86 {a}{b}{c}", "+86-{a}-{b}-{c}", "0086{a}{b}{c}"]
    ),
    after=_FILLER,
)
def test_chinese_mobiles_in_random_text_are_always_found(before: str, number: str, style: str, after: str) -> None:
    written = style.format(a=number[:3], b=number[3:7], c=number[7:])
    text = f"{before} 电话{written}，{after}"
    assert ("phone", written) in kinds_found(text)


@settings(max_examples=100, deadline=None)
@given(
    local=st.from_regex(r"\A[a-z0-9][a-z0-9._+-]{0,20}[a-z0-9]\Z"),
    domain=st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,15}[a-z0-9]\Z"),
    tld=st.sampled_from(["com", "cn", "com.cn", "co.uk", "io", "org"]),
    after=_FILLER,
)
def test_emails_in_random_text_are_always_found(local: str, domain: str, tld: str, after: str) -> None:
    address = f"{local}@{domain}.{tld}"
    assert ("email", address) in kinds_found(f"邮箱：{address} {after}")
