"""Generated customer-service conversations that call tools, in OpenAI's fine-tuning format: the assistant looks an
order up (`lookup_order`) or opens a return (`create_return`), reads the tool's result and answers from it.

What a support bot in front of an order system is trained on. The default model's own template renders no tools;
train on a copy imported with `configs/chat_templates/chatml-tools.jinja` (`configs/finetune/support-tools.yaml`).
"""

from __future__ import annotations

import json
import random
from typing import Any

from finetune.sample_data import _COMPANIES, _COURIERS, _PRODUCTS, _order_id

TOOLS_FILE = "customer-service-tools.jsonl"

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Look up an order's status, courier and expected delivery.",
        "parameters": {"type": "object", "required": ["order_id"],
                       "properties": {"order_id": {"type": "string", "description": "e.g. NW-AB12345"}}}}},
    {"type": "function", "function": {
        "name": "create_return", "description": "Open a return for an order and get its return number.",
        "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string"},
            "reason": {"type": "string", "enum": ["damaged", "wrong_item", "changed_mind"]}},
            "required": ["order_id", "reason"]}}},
]


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def _lookup(r: random.Random, order: str, product: str, lang: str) -> list[dict[str, Any]]:
    days, courier = r.randint(1, 6), r.choice(_COURIERS[lang])
    status = {"order_id": order, "status": "shipped", "courier": courier, "eta_days": days}
    ask = (r.choice((f"Where is my order {order}?", f"Can you check order {order} for me?",
                     f"Any news on order {order}? It's the {product}."))
           if lang == "en" else r.choice((f"我的订单 {order} 到哪了？", f"帮我查一下订单 {order}。")))
    answer = (f"Order {order} has shipped with {courier} and should arrive within {days} days."
              if lang == "en" else f"订单 {order} 已由{courier}发出，预计 {days} 天内送达。")
    return [{"role": "user", "content": ask}, _call("call_1", "lookup_order", {"order_id": order}),
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(status, ensure_ascii=False)},
            {"role": "assistant", "content": answer}]


def _return(r: random.Random, order: str, product: str, lang: str) -> list[dict[str, Any]]:
    reason, number = r.choice(("damaged", "wrong_item", "changed_mind")), f"R-{r.randint(100000, 999999)}"
    why = {"damaged": "it arrived damaged", "wrong_item": "I got the wrong item", "changed_mind": "I changed my mind"}
    ask = (f"I want to return the {product} from order {order}, {why[reason]}." if lang == "en"
           else f"订单 {order} 的{product}我要退货，原因：" + {"damaged": "收到时已损坏", "wrong_item": "发错货了",
                                                         "changed_mind": "不想要了"}[reason])
    answer = (f"Your return {number} for order {order} is open; a courier will collect the parcel within 3 days."
              if lang == "en" else f"已为订单 {order} 创建退货单 {number}，快递员会在 3 天内上门取件。")
    return [{"role": "user", "content": ask},
            _call("call_1", "create_return", {"order_id": order, "reason": reason}),
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"return_id": number})},
            {"role": "assistant", "content": answer}]


def tool_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows {"messages", "tools"}, each with a system prompt, one call, its result and the answer."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        lang = r.choice(("en", "zh"))
        product = r.choice(_PRODUCTS)[0 if lang == "en" else 1]
        company = r.choice(_COMPANIES[lang])
        system = (f"You are the customer-service assistant of {company}. Use the tools to look orders up."
                  if lang == "en" else f"你是{company}的客服助手，请用工具查询订单。")
        turns = r.choice((_lookup, _lookup, _return))(r, _order_id(r), product, lang)
        rows.append({"messages": [{"role": "system", "content": system}, *turns], "tools": TOOLS})
    return rows
