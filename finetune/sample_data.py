"""Sample fine-tune data made by the project: customer-service and sales conversations, Chinese and English.

    sovereign finetune sample-data OUT_DIR [--conversations 3000 --seed 0]

Every stage of `prepare` gets something to do: planted PII (mobile numbers, 18-digit ID numbers with a valid check
digit, bank cards with a valid Luhn digit, e-mails, addresses), exact, whitespace/case and near duplicates, a
separate file of broken rows with the problem each line must raise, canary strings for the leak probe, and
ShareGPT / Alpaca / CSV renderings of a slice for the converters. `manifest.json` records all of it.

Only `random.Random(seed)` decides anything and every file is written with fixed separators and newlines, so the same
seed gives byte-identical files (no timestamps anywhere).
"""

from __future__ import annotations

import csv
import io
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovereign.formats import sha256_file, write_json_atomic
from sovereign.pii import id_check_char, luhn_check_digit

GENERATOR_VERSION = 1
MAIN_FILE = "customer-service.jsonl"
BROKEN_FILE = "broken.jsonl"
SHAREGPT_FILE = "sharegpt.json"
ALPACA_FILE = "alpaca.json"
CSV_FILE = "customer-service.csv"
MANIFEST_FILE = "manifest.json"

Message = dict[str, Any]

# ------------------------------------------------------------------------------------------------ personal data


_CN_MOBILE_PREFIXES = ("135", "136", "138", "139", "150", "152", "158", "177", "186", "188", "189", "199")
_REGIONS = ("110105", "310104", "440305", "330106", "510107", "420111", "320102", "210203")


class Pii:
    """Makes unique personal data values and remembers each one (kind, value, where) for the manifest."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.planted: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self.conversation = -1

    def _unique(self, make) -> str:
        while True:
            value = make()
            if value not in self._seen:
                self._seen.add(value)
                return value

    def _plant(self, kind: str, value: str) -> str:
        self.planted.append({"kind": kind, "value": value, "conversation": self.conversation})
        return value

    def cn_mobile(self) -> str:
        r = self.rng
        digits = self._unique(lambda: r.choice(_CN_MOBILE_PREFIXES) + "".join(r.choices(string.digits, k=8)))
        style = r.randrange(4)
        value = {0: digits, 1: f"{digits[:3]}-{digits[3:7]}-{digits[7:]}", 2: f"{digits[:3]} {digits[3:7]} {digits[7:]}",
                 3: f"+86 {digits}"}[style]
        return self._plant("phone", value)

    def en_phone(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            value = self._unique(lambda: f"+1 {r.randint(201, 989)}-{r.randint(200, 989)}-{r.randint(1000, 9999)}")
        else:
            value = self._unique(lambda: f"+44 7{r.randint(100, 999)} {r.randint(100000, 999999)}")
        return self._plant("phone", value)

    def id_number(self) -> str:
        r = self.rng

        def make() -> str:
            birth = f"{r.randint(1960, 2004)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
            first17 = r.choice(_REGIONS) + birth + f"{r.randint(0, 999):03d}"
            return first17 + id_check_char(first17)

        return self._plant("id_number", self._unique(make))

    def bank_card(self) -> str:
        r = self.rng

        def make() -> str:
            prefix, length = r.choice((("622202", 19), ("621700", 19), ("4", 16), ("5", 16), ("622848", 19)))
            body = prefix + "".join(r.choices(string.digits, k=length - len(prefix) - 1))
            return body + luhn_check_digit(body)

        number = self._unique(make)
        if r.random() < 0.4:
            number = " ".join(number[i:i + 4] for i in range(0, len(number), 4))
        return self._plant("bank_card", number)

    def email(self, lang: str) -> str:
        r = self.rng

        def make() -> str:
            if lang == "zh":
                user = r.choice(("zhang", "wang", "li", "liu", "chen", "yang", "zhao", "huang")) + r.choice(
                    ("wei", "fang", "na", "min", "jing", "lei", "yang", "jun")) + str(r.randint(10, 9999))
                return user + "@" + r.choice(("qq.com", "163.com", "126.com", "sina.com", "foxmail.com"))
            user = r.choice(("alex", "sam", "jordan", "taylor", "morgan", "casey", "jamie", "riley")) + r.choice(
                (".", "_", "")) + r.choice(("smith", "brown", "lee", "garcia", "miller", "davis")) + str(r.randint(1, 999))
            return user + "@" + r.choice(("gmail.com", "outlook.com", "yahoo.com", "fastmail.com", "proton.me"))

        return self._plant("email", self._unique(make))

    def address(self, lang: str) -> str:
        r = self.rng
        if lang == "zh":
            make = lambda: (r.choice(("北京市朝阳区", "上海市浦东新区", "广东省深圳市南山区", "浙江省杭州市西湖区",  # noqa: E731
                                      "四川省成都市武侯区", "江苏省南京市鼓楼区"))
                            + r.choice(("建国路", "世纪大道", "科技园南路", "文三路", "人民南路", "中山北路"))
                            + f"{r.randint(1, 999)}号{r.randint(1, 30)}栋{r.randint(101, 2808)}室")
        else:
            make = lambda: (f"{r.randint(10, 9899)} " + r.choice(("Maple", "Oak", "Cedar", "Lakeview", "Hillcrest",  # noqa: E731
                                                                  "Sunset", "Park", "River"))
                            + r.choice((" Street", " Avenue", " Road", " Drive")) + ", "
                            + r.choice(("Springfield, IL 62704", "Austin, TX 78701", "Portland, OR 97205",
                                        "Denver, CO 80202", "Columbus, OH 43215")))
        return self._plant("address", self._unique(make))


# ------------------------------------------------------------------------------------------------ vocabulary

_COMPANIES = {"en": ("Northwind Home", "BrightPath Electronics", "Cedar & Co. Outdoor"),
              "zh": ("青禾家居", "星河电子", "远山户外")}
_PRODUCTS = (  # (english, chinese, low price, high price)
    ("AirFlow 300 air purifier", "AirFlow 300 空气净化器", 899, 1599),
    ("Nimbus robot vacuum", "Nimbus 扫地机器人", 1299, 2999),
    ("Aurora 27-inch monitor", "Aurora 27 英寸显示器", 1499, 3299),
    ("TrailLite 2-person tent", "TrailLite 双人帐篷", 499, 1199),
    ("Breeze standing desk", "Breeze 升降桌", 1899, 3599),
    ("Echo Pro noise-cancelling headphones", "Echo Pro 降噪耳机", 699, 1899),
    ("Summit 40L hiking backpack", "Summit 40 升登山包", 359, 899),
    ("Kettle One smart kettle", "Kettle One 智能电水壶", 199, 459),
    ("Lumen desk lamp", "Lumen 护眼台灯", 159, 399),
    ("FrostBox portable fridge", "FrostBox 车载冰箱", 999, 2199),
)
_COURIERS = {"en": ("UPS", "FedEx", "DHL", "the regional courier"), "zh": ("顺丰", "京东物流", "中通", "圆通")}


def _order_id(r: random.Random) -> str:
    # Letters keep order numbers from looking like phone or card numbers to the PII scanner.
    return r.choice(("NW", "BP", "CO", "QH", "XH")) + "-" + "".join(r.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=2)) + str(
        r.randint(10000, 99999))


def _pick(r: random.Random, *options: str) -> str:
    return r.choice(options)


@dataclass
class Slots:
    lang: str
    company: str
    product: str
    price: int
    order: str
    courier: str
    days: int
    qty: int

    @classmethod
    def draw(cls, r: random.Random, lang: str) -> Slots:
        en, zh, lo, hi = r.choice(_PRODUCTS)
        return cls(lang, r.choice(_COMPANIES[lang]), en if lang == "en" else zh, r.randrange(lo, hi, 10),
                   _order_id(r), r.choice(_COURIERS[lang]), r.randint(2, 12), r.randint(2, 60))


def _system_prompt(r: random.Random, s: Slots, domain: str) -> str:
    if s.lang == "en":
        role = "customer-service" if domain == "cs" else "sales"
        return _pick(r, f"You are the {role} assistant of {s.company}. Be accurate, polite and brief.",
                     f"You work in {role} at {s.company}. Answer in English, never invent order details, and offer a "
                     f"human agent when the customer asks for one.",
                     f"{s.company} {role} assistant. Follow company policy: 30-day returns, 1-year warranty, refunds "
                     f"within 5 business days.")
    role = "客服" if domain == "cs" else "销售顾问"
    return _pick(r, f"你是{s.company}的{role}助手，回答要准确、礼貌、简洁。",
                 f"你是{s.company}的在线{role}。请用中文回答，不要编造订单信息；客户要求时转接人工。",
                 f"{s.company}{role}助手。公司政策：30 天无理由退货，一年保修，退款 5 个工作日内到账。")


def _pii_mention(r: random.Random, pii: Pii, s: Slots) -> str:
    """A sentence in which the customer volunteers personal data, as real chats do.

    Values are drawn only once the sentence is chosen: every value drawn is recorded as planted.
    """
    kind = r.choice(("phone", "phone", "email", "address", "id_number", "bank_card"))
    if s.lang == "en":
        if kind == "phone":
            return ("You can reach me on {}." if r.random() < 0.5 else "My number is {}.").format(pii.en_phone())
        if kind == "email":
            return ("My email is {}." if r.random() < 0.5 else "Send it to {} please.").format(pii.email("en"))
        if kind == "address":
            return f"The delivery address is {pii.address('en')}."
        if kind == "id_number":
            return f"The account is registered under ID {pii.id_number()}."
        return f"I paid with the card {pii.bank_card()}."
    if kind == "phone":
        return ("我的手机号是{}。" if r.random() < 0.5 else "有事打我电话 {}。").format(pii.cn_mobile())
    if kind == "email":
        return f"我的邮箱是 {pii.email('zh')}。"
    if kind == "address":
        return f"收货地址是{pii.address('zh')}。"
    if kind == "id_number":
        return f"实名信息身份证号 {pii.id_number()}。"
    return f"付款用的银行卡是 {pii.bank_card()}。"


# Each intent returns (user, assistant) exchanges. Phrases are composed from several pools so conversations of the
# same intent differ in more than their slots (otherwise near-duplicate removal would eat the natural data).


def _order_status(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"Hi, where is my order {s.order}?", f"Can you check the status of order {s.order}?",
                       f"I ordered the {s.product} last week (order {s.order}) and haven't heard anything."),
                 _pick(r, f"Order {s.order} for the {s.product} shipped with {s.courier} and should arrive within "
                          f"{s.days} days.", f"I can see order {s.order}: it has left our warehouse and is with "
                                             f"{s.courier}. Expected delivery is in {s.days} days.")),
                (_pick(r, "Can I get a tracking link?", "Is there a tracking number?", "Will someone call before "
                                                                                         "delivery?"),
                 _pick(r, "Yes, the tracking details were sent to the contact on your account; the courier will also "
                          "message you on the delivery day.", "The tracking number is in your order confirmation, "
                                                              "and the courier notifies you the day before."))]
    return [(_pick(r, f"你好，我的订单 {s.order} 到哪了？", f"帮我查一下订单 {s.order} 的状态。",
                   f"上周买的{s.product}（订单号 {s.order}）一直没消息。"),
             _pick(r, f"订单 {s.order} 的{s.product}已由{s.courier}发出，预计 {s.days} 天内送达。",
                   f"查到了，订单 {s.order} 已出库，目前在{s.courier}运输中，大约 {s.days} 天到。")),
            (_pick(r, "有物流单号吗？", "送货前会打电话吗？", "能给我一个查询链接吗？"),
             _pick(r, "物流单号已发送到您账户绑定的联系方式，派送当天快递员也会联系您。",
                   "单号在订单详情页可以看到，快递员派送前会提前通知您。"))]


def _delivery_delay(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"My {s.product} was supposed to arrive {s.days} days ago. This is getting ridiculous.",
                       f"Order {s.order} is late. The site promised delivery last {_pick(r, 'Monday', 'Friday')}."),
                 _pick(r, f"I'm sorry for the delay. {s.courier} reports a backlog at the sorting centre; your parcel "
                          f"is moving again and I have flagged it as priority.",
                       f"Apologies — order {s.order} was held at a depot. I've opened a trace with {s.courier} and "
                       f"will add a shipping refund to your account.")),
                (_pick(r, "Can you just cancel it then?", "What if it doesn't come by the weekend?"),
                 _pick(r, "If it hasn't arrived within 3 business days I can cancel it and refund you in full.",
                       "Should it miss the weekend, reply here and we will either resend or refund, your choice."))]
    return [(_pick(r, f"{s.product}说好 {s.days} 天前就到，现在还没到，太慢了。",
                   f"订单 {s.order} 超时了，页面上写的是上周{_pick(r, '一', '五')}送达。"),
             _pick(r, f"非常抱歉让您久等了。{s.courier}分拣中心积压，包裹已恢复运输，我已为您加急。",
                   f"抱歉，订单 {s.order} 在中转站滞留了。我已向{s.courier}发起催件，并为您补偿运费。")),
            (_pick(r, "那能直接取消吗？", "周末前还不到怎么办？"),
             _pick(r, "如果 3 个工作日内仍未送达，可以为您取消订单并全额退款。",
                   "周末前没到的话，请在这里回复，我们为您补发或退款，由您选择。"))]


def _refund(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"I'd like to return the {s.product} and get my money back.",
                       f"How do I get a refund for order {s.order}? It's not what I expected."),
                 _pick(r, f"Of course. The {s.product} is within our 30-day return window. I've created a return "
                          f"label; once {s.courier} scans the parcel, the refund of {s.price} goes back to your "
                          f"original payment method within 5 business days.",
                       f"No problem — order {s.order} qualifies for a full refund. Pack the item, use the prepaid "
                       f"label I just emailed, and you'll see {s.price} refunded within 5 business days.")),
                (_pick(r, "Do I need the original box?", "Can the refund go to a different card?"),
                 _pick(r, "The original box helps but isn't required; any sturdy packaging is fine.",
                       "Refunds can only go back to the payment method used for the order, for security reasons."))]
    return [(_pick(r, f"我想退掉{s.product}，申请退款。", f"订单 {s.order} 怎么退款？东西和描述不一样。"),
             _pick(r, f"可以的，{s.product}在 30 天无理由退货期内。退货单已生成，{s.courier}揽收后，{s.price} 元将在 5 个"
                      f"工作日内原路退回。",
                   f"没问题，订单 {s.order} 符合全额退款条件。请打包商品并使用预付快递单寄回，{s.price} 元 5 个工作日内到账。")),
            (_pick(r, "需要原包装吗？", "退款能退到别的卡吗？"),
             _pick(r, "有原包装更好，没有的话用结实的箱子包装即可。", "为了资金安全，退款只能原路退回下单时的支付方式。"))]


def _warranty(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"My {s.product} stopped working after {s.qty} days. Is it under warranty?",
                       f"The {s.product} makes a grinding noise now. I bought it {s.qty} weeks ago."),
                 _pick(r, f"Sorry to hear that. The {s.product} has a 1-year warranty, so a repair or replacement is "
                          f"free. Could you send a short video of the problem?",
                       f"That's covered by the 1-year warranty. Please try a reset first (hold the power button for "
                       f"10 seconds); if the noise continues we'll replace the unit.")),
                (_pick(r, "I've uploaded the video.", "The reset didn't help."),
                 _pick(r, "Thanks — I've approved a replacement. A courier will collect the faulty unit when the "
                          "new one is delivered.", "Understood. I've approved a free replacement; you'll receive a "
                                                   "pickup notice within 24 hours."))]
    return [(_pick(r, f"{s.product}用了 {s.qty} 天就坏了，在保修期内吗？", f"{s.product}现在有异响，买了 {s.qty} 周。"),
             _pick(r, f"很抱歉给您带来不便。{s.product}享受一年保修，维修或换新都免费。方便发一段故障视频吗？",
                   f"这在一年保修范围内。请先长按电源键 10 秒重置；如果仍有异响，我们为您换新。")),
            (_pick(r, "视频已经上传了。", "重置了也没用。"),
             _pick(r, "收到，已为您批准换新，新机送达时快递员会回收故障机。", "明白了，已批准免费换新，24 小时内您会收到上门取件通知。"))]


def _complaint(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, "Your delivery driver left the parcel in the rain and the box was soaked.",
                       "I was charged twice for the same order. This is unacceptable.",
                       f"The {s.product} arrived with a cracked panel and nobody answers the phone."),
                 _pick(r, "I'm very sorry — that's not the experience we want you to have. I've logged a formal "
                          "complaint and our quality team will review it within 48 hours.",
                       "You're right to be upset, and I apologise. I've escalated this and added a credit to your "
                       "account while we sort it out."))]
    return [(_pick(r, "快递员把包裹扔在雨里，箱子全湿了。", "同一个订单被扣了两次款，太过分了。",
                   f"{s.product}到货时面板裂了，打电话也没人接。"),
             _pick(r, "非常抱歉，这不是我们希望带给您的体验。已为您登记正式投诉，质检团队会在 48 小时内处理。",
                   "您的不满完全可以理解，向您道歉。我已升级处理，并先为您账户发放一张补偿券。"))]


def _handover(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, "I want to talk to a real person.", "Can you transfer me to a human agent?",
                       "This bot isn't helping, get me a manager."),
                 _pick(r, "Of course. I'm transferring you to a human agent now; the current wait is about "
                          f"{s.days} minutes. I've passed on the conversation so you won't need to repeat yourself.",
                       "Sure — connecting you with a member of our support team. They'll see this chat history."))]
    return [(_pick(r, "我要找人工客服。", "转人工。", "机器人解决不了，帮我找个主管。"),
             _pick(r, f"好的，正在为您转接人工客服，预计等待约 {s.days} 分钟。聊天记录会同步给客服，您无需重复描述。",
                   "没问题，马上为您转接人工，客服可以看到之前的对话记录。"))]


def _product_question(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"Does the {s.product} come with a warranty?", f"How loud is the {s.product}?",
                       f"What's the difference between the {s.product} and last year's model?"),
                 _pick(r, f"The {s.product} comes with a 1-year warranty and free returns within 30 days. It's also "
                          f"one of our best-rated models.", f"Compared with last year's, the {s.product} is "
                                                            f"lighter, uses less power and has a longer warranty.")),
                (_pick(r, "Is it in stock?", "How much is it right now?"),
                 _pick(r, f"Yes, it's in stock and ships within 24 hours. The current price is {s.price}.",
                       f"It's {s.price} at the moment, and in stock at our main warehouse."))]
    return [(_pick(r, f"{s.product}有保修吗？", f"{s.product}噪音大吗？", f"{s.product}和去年的款有什么区别？"),
             _pick(r, f"{s.product}提供一年保修，30 天内可无理由退货，同类产品里口碑也是最好的。",
                   f"和去年的款相比，{s.product}更轻、更省电，保修期也更长。")),
            (_pick(r, "现在有货吗？", "现在多少钱？"),
             _pick(r, f"有现货，24 小时内发货，目前售价 {s.price} 元。", f"目前售价 {s.price} 元，主仓有货。"))]


def _quote(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    unit = s.price * (100 - min(s.qty, 30) // 3) // 100
    if s.lang == "en":
        return [(_pick(r, f"We need {s.qty} units of the {s.product} for our office. Can you quote?",
                       f"What's your best price for {s.qty} x {s.product}?"),
                 _pick(r, f"For {s.qty} units the price is {unit} each ({unit * s.qty} in total), delivery included. "
                          f"The quote is valid for 14 days.", f"I can offer {unit} per unit for {s.qty} units, "
                                                             f"{unit * s.qty} in total with free delivery.")),
                (_pick(r, "Can you do better if we pay upfront?", "Does that include installation?"),
                 _pick(r, "With payment upfront I can add a further 3% discount.",
                       "Installation is not included, but we can arrange it for a small fee per unit."))]
    return [(_pick(r, f"公司需要 {s.qty} 台{s.product}，能报个价吗？", f"{s.product}买 {s.qty} 台最低什么价？"),
             _pick(r, f"{s.qty} 台的单价是 {unit} 元，总价 {unit * s.qty} 元，含运费，报价 14 天内有效。",
                   f"{s.qty} 台可以给到每台 {unit} 元，合计 {unit * s.qty} 元，免运费。")),
            (_pick(r, "预付款能再便宜点吗？", "包安装吗？"),
             _pick(r, "全款预付可以再优惠 3%。", "不含安装，不过可以为您安排，每台收取少量安装费。"))]


def _follow_up(r: random.Random, s: Slots) -> list[tuple[str, str]]:
    if s.lang == "en":
        return [(_pick(r, f"Following up on the quote for the {s.product} you sent last week.",
                       "Hi again, we discussed a bulk order last week. Any update?"),
                 _pick(r, f"Thanks for following up! The quote for {s.qty} units of the {s.product} is still valid. "
                          f"Shall I prepare the order?", "Good to hear from you. The offer still stands; I can "
                                                         "reserve stock for you until Friday.")),
                (_pick(r, "Yes, please go ahead.", "Let me check with my manager first."),
                 _pick(r, "Great — I'll send the order confirmation and invoice today.",
                       "Of course. I'll keep the reservation until Friday; just reply here when you're ready."))]
    return [(_pick(r, f"上周您发的{s.product}报价，我这边跟进一下。", "你好，上周谈的批量采购有进展吗？"),
             _pick(r, f"感谢跟进！{s.qty} 台{s.product}的报价仍然有效，需要为您下单吗？", "您好，报价依然有效，库存可以为您保留到周五。")),
            (_pick(r, "好的，下单吧。", "我先和领导确认一下。"),
             _pick(r, "好的，今天就把订单确认和发票发给您。", "没问题，库存保留到周五，确认后在这里回复即可。"))]


INTENTS = {"cs": (_order_status, _delivery_delay, _refund, _warranty, _complaint, _handover),
           "sales": (_product_question, _quote, _follow_up)}
_CLOSERS = {"en": (("Thanks!", "You're welcome. Is there anything else I can help with?"),
                   ("Great, that's all.", "Happy to help. Have a good day!"),
                   ("OK, thank you for your help.", "Anytime — thanks for choosing us.")),
            "zh": (("谢谢！", "不客气，还有其他可以帮您的吗？"), ("好的，没别的了。", "很高兴为您服务，祝您生活愉快！"),
                   ("行，谢谢帮忙。", "不客气，感谢您的支持。"))}


_OPENERS = {"en": {"user": ("", "Hi. ", "Hello, ", "Good morning. ", "Hey there. ", "Quick question: ", "Hi team, "),
                   "assistant": ("", "Thanks for reaching out. ", "Happy to help. ", "Let me check that for you. ",
                                 "Thanks for waiting. ")},
            "zh": {"user": ("", "你好，", "您好，", "在吗？", "麻烦问下，", "客服你好，"),
                   "assistant": ("", "您好，", "感谢您的耐心等待。", "我来帮您查一下。", "收到。")}}


def conversation(r: random.Random, pii: Pii) -> list[Message]:
    """One conversation: a system prompt, one to four exchanges, sometimes with personal data in a user turn."""
    lang = r.choice(("en", "zh"))
    domain = "cs" if r.random() < 0.65 else "sales"
    s = Slots.draw(r, lang)
    exchanges = r.choice(INTENTS[domain])(r, s)
    exchanges = exchanges[:r.randint(1, len(exchanges))]
    if r.random() < 0.3:  # a second topic in the same chat
        exchanges += r.choice(INTENTS[domain])(r, s)[:1]
    if r.random() < 0.5:
        exchanges.append(r.choice(_CLOSERS[lang]))
    opener_u, opener_a = r.choice(_OPENERS[lang]["user"]), r.choice(_OPENERS[lang]["assistant"])
    user0, assistant0 = exchanges[0]
    exchanges[0] = (opener_u + user0, opener_a + assistant0)
    messages: list[Message] = [{"role": "system", "content": _system_prompt(r, s, domain)}]
    mention_at = r.randrange(len(exchanges)) if r.random() < 0.45 else -1
    for i, (user, assistant) in enumerate(exchanges):
        if i == mention_at:
            user = f"{user} {_pii_mention(r, pii, s)}" if lang == "en" else user + _pii_mention(r, pii, s)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


# ------------------------------------------------------------------------------------------------ the data set


def _near_duplicate(r: random.Random, messages: list[Message]) -> list[Message]:
    """A copy with one small edit, as re-exported or lightly edited tickets look."""
    out = [dict(m) for m in messages]
    i = r.choice([k for k, m in enumerate(out) if m["role"] == "user"])
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in out[i]["content"])
    out[i]["content"] += r.choice(("！", "？", "急") if zh else ("!", "?", " pls"))
    return out


def _space_variant(messages: list[Message]) -> list[Message]:
    """The same text with stray spacing: an exact duplicate once text is normalised.

    Spacing only: lower-casing would also hide English addresses from sovereign.pii, which wants capitalised
    street names (a known limit of its conservative address rule).
    """
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "user":
            m["content"] = "  " + m["content"] + " \n"
    return out


def _canary(r: random.Random) -> str:
    return "CANARY-" + "".join(r.choices("BCDFGHJKLMNPQRSTVWXZ", k=5)) + "-" + "".join(
        r.choices("bcdfghjkmnpqrstvwxz", k=6))


@dataclass
class SampleSet:
    rows: list[list[Message]] = field(default_factory=list)
    exact: list[list[int]] = field(default_factory=list)  # [line of original, line of duplicate], 1-based
    near: list[list[int]] = field(default_factory=list)
    canaries: list[dict[str, Any]] = field(default_factory=list)


def build(conversations: int, seed: int) -> tuple[SampleSet, Pii]:
    """The main file's rows in order: unique conversations, then duplicates and canaries placed at random lines."""
    r = random.Random(seed)
    pii = Pii(r)
    n_dups = max(2, conversations // 25)  # about 4% exact/normalised duplicates and 4% near duplicates
    n_canaries = 8
    n_unique = conversations - 2 * n_dups
    if n_unique < 20:
        raise ValueError("conversations must be at least 60")
    base: list[list[Message]] = []
    for i in range(n_unique):
        pii.conversation = i
        base.append(conversation(r, pii))
    # Canaries go into conversations without personal data, in place (a copy would be a near duplicate and dedup
    # would drop one of the two); those conversations are never duplicated.
    planted_in = {p["conversation"] for p in pii.planted}
    canary_at: dict[int, dict[str, Any]] = {}
    for src in r.sample([i for i in range(n_unique) if i not in planted_in], n_canaries):
        secret = _canary(r)
        msgs = base[src]
        zh = any("\u4e00" <= ch <= "\u9fff" for ch in msgs[0]["content"])
        note = f"内部工单备注：{secret}。" if zh else f" Internal ticket note: {secret}."
        last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        msgs[last] = {"role": "assistant", "content": msgs[last]["content"] + note}
        canary_at[src] = {"canary": secret, "message_index": last, "prompt_messages": msgs[:last]}
    # Extra rows are inserted after their original, never before, so "keep the first" keeps the original.
    inserts: list[tuple[int, str, list[Message]]] = []
    sources = [i for i in range(n_unique) if i not in canary_at]
    multi_turn = [i for i in sources if sum(m["role"] == "user" for m in base[i]) >= 2]
    for k in range(n_dups):
        src = r.choice(sources)
        inserts.append((src, "exact", [dict(m) for m in base[src]] if k % 2 else _space_variant(base[src])))
        # A one-character edit of a one-exchange chat is not "near" any more at the default threshold.
        src = r.choice(multi_turn)
        inserts.append((src, "near", _near_duplicate(r, base[src])))
    r.shuffle(inserts)
    # Lay rows out: each insert goes to a random position after its source.
    order: list[tuple[str, int, list[Message]]] = [("base", i, m) for i, m in enumerate(base)]
    for src, kind, msgs in inserts:
        src_pos = next(p for p, row in enumerate(order) if row[0] == "base" and row[1] == src)
        order.insert(r.randint(src_pos + 1, len(order)), (kind, src, msgs))
    out = SampleSet()
    line_of_base = {row[1]: p + 1 for p, row in enumerate(order) if row[0] == "base"}
    for p, (kind, src, msgs) in enumerate(order):
        out.rows.append(msgs)
        if kind in ("exact", "near"):
            getattr(out, kind).append([line_of_base[src], p + 1])
    out.canaries = [{**info, "line": line_of_base[src]} for src, info in sorted(canary_at.items())]
    # Personal data is recorded by the line it ended up on (duplicates repeat it on more lines).
    for item in pii.planted:
        item["lines"] = [p + 1 for p, row in enumerate(order) if row[1] == item["conversation"]
                         and any(item["value"] in m["content"] for m in row[2])]
    return out, pii


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _broken_rows(r: random.Random, good: list[list[Message]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Valid rows with one broken row of each kind spliced in; returns lines and the expected problems."""
    long_text = " ".join(r.choice(("refund", "order", "delivery", "warranty", "please", "check")) for _ in range(9000))
    broken = [
        ("invalid_json", '{"messages": [{"role": "user", "content": "Where is my parcel?"}'),
        ("data_type", json.dumps(["not", "an", "object"])),
        ("missing_messages_list", json.dumps({"conversation": [{"role": "user", "content": "hello"}]})),
        ("missing_messages_list", json.dumps({"messages": []})),
        ("unrecognized_role", json.dumps({"messages": [{"role": "customer", "content": "Is it in stock?"},
                                                       {"role": "assistant", "content": "Yes, it is."}]})),
        ("missing_content", json.dumps({"messages": [{"role": "user", "content": "Can I get a refund?"},
                                                     {"role": "assistant", "content": ""}]})),
        ("message_missing_key", json.dumps({"messages": [{"content": "Do you sell gift cards?"},
                                                         {"role": "assistant", "content": "Yes, from 50 to 500."}]})),
        ("example_missing_assistant_message", json.dumps(
            {"messages": [{"role": "system", "content": "You are a helpful agent."},
                          {"role": "user", "content": "我的订单到哪了？"}]}, ensure_ascii=False)),
        ("no_trainable_tokens", json.dumps({"messages": [{"role": "user", "content": "Do you ship abroad?"},
                                                         {"role": "assistant", "content": "Yes, to 30 countries.",
                                                          "weight": 0}]})),
        ("message_unrecognized_key", json.dumps({"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "mood": "cheerful"}]})),
        ("invalid_tool_call", json.dumps({"messages": [
            {"role": "user", "content": "Cancel order 5120 please."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "cancel_order", "arguments": "order_id=5120"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"cancelled": true}'},
            {"role": "assistant", "content": "Order 5120 is cancelled."}]})),
        # Well formed, but the default model's own template renders no tools (chatml-tools.jinja does).
        ("template_lacks_tools", json.dumps({"messages": [
            {"role": "user", "content": "Where is order 4417?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_order_status", "arguments": '{"order_id": "4417"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
            {"role": "assistant", "content": "Order 4417 has shipped."}]})),
        ("too_long", json.dumps({"messages": [{"role": "user", "content": long_text},
                                              {"role": "assistant", "content": "That is a long message."}]})),
    ]
    rows: list[tuple[str, str | None]] = [(json.dumps({"messages": m}, ensure_ascii=False), None) for m in good]
    for code, text in broken:
        rows.insert(r.randint(1, len(rows)), (text, code))
    expected = [{"line": i + 1, "code": code} for i, (_, code) in enumerate(rows) if code is not None]
    return [text for text, _ in rows], expected


def to_sharegpt(messages: list[Message]) -> dict[str, Any]:
    names = {"user": "human", "assistant": "gpt"}
    row: dict[str, Any] = {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                             for m in messages if m["role"] != "system"]}
    if messages and messages[0]["role"] == "system":
        row["system"] = messages[0]["content"]
    return row


def to_alpaca(messages: list[Message]) -> dict[str, Any]:
    """Alpaca with `history` ([[user, assistant], ...]) for the turns before the last, as LLaMA-Factory reads it."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    *history, (instruction, output) = pairs
    row: dict[str, Any] = {"instruction": instruction, "input": "", "output": output}
    if system is not None:
        row["system"] = system
    if history:
        row["history"] = history
    return row


def to_csv(conversations: list[list[Message]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["conversation_id", "role", "content"])
    for i, messages in enumerate(conversations):
        for m in messages:
            writer.writerow([f"c{i + 1:05d}", m["role"], m["content"]])
    return buf.getvalue()


def generate(out_dir: Path, *, conversations: int = 3000, seed: int = 0, slice_size: int = 200) -> dict[str, Any]:
    """Write the sample set into `out_dir` and return its manifest (also written as manifest.json)."""
    from finetune.sample_tools import TOOLS_FILE, tool_conversations  # it builds on this module's slots

    sample, pii = build(conversations, seed)
    r = random.Random(seed + 1)
    half = len(sample.rows) // 2
    slice_size = min(slice_size, half)
    slice_rows = sample.rows[:slice_size]
    broken_lines, broken_expected = _broken_rows(r, sample.rows[half:half + 60])
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        MAIN_FILE: _jsonl([{"messages": m} for m in sample.rows]),
        BROKEN_FILE: "".join(line + "\n" for line in broken_lines),
        SHAREGPT_FILE: json.dumps([to_sharegpt(m) for m in slice_rows], ensure_ascii=False, indent=1) + "\n",
        ALPACA_FILE: json.dumps([to_alpaca(m) for m in slice_rows], ensure_ascii=False, indent=1) + "\n",
        CSV_FILE: to_csv(slice_rows),
        TOOLS_FILE: _jsonl(tool_conversations(max(40, len(sample.rows) // 5), seed)),
    }
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(text.encode("utf-8"))
        tmp.replace(out_dir / name)
    manifest = {
        "generator": "finetune.sample_data", "version": GENERATOR_VERSION, "seed": seed,
        "conversations": len(sample.rows),
        "files": {name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size}
                  for name in texts},
        "slice": {"source": MAIN_FILE, "first_lines": slice_size,
                  "variants": [SHAREGPT_FILE, ALPACA_FILE, CSV_FILE]},
        "duplicates": {"exact": sample.exact, "near": sample.near},
        "canaries": sample.canaries,
        "broken": {"file": BROKEN_FILE, "problems": broken_expected},
        # Raw values on purpose: this manifest describes the input, and tests grep prepared output for each one.
        "pii": [{"kind": p["kind"], "value": p["value"], "lines": p["lines"]} for p in pii.planted],
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return manifest
