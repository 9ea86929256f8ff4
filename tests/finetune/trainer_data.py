"""Small, deterministic customer-service conversations for the trainer's tests and benchmark (not the sample data
generator of `sovereign finetune`, which is larger and dirtier on purpose).

The agent answers in a fixed house style ("Acme support: ... Reference CS-<n>.") that the base model does not know,
so a few dozen LoRA steps measurably lower the validation loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = ["kettle", "headphones", "desk lamp", "blender", "phone case", "rice cooker", "backpack", "monitor"]
CITIES = ["Shanghai", "Berlin", "Austin", "Lyon", "Osaka", "Toronto"]
ZH_PRODUCTS = ["电水壶", "耳机", "台灯", "搅拌机", "手机壳", "电饭煲"]


def conversation(rng: random.Random, n: int) -> dict:
    product = rng.choice(PRODUCTS)
    order = rng.randint(10000, 99999)
    kind = rng.randrange(4)
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are Acme's customer-service agent."})
    if kind == 0:
        days = rng.randint(2, 6)
        messages += [
            {"role": "user", "content": f"Hi, where is my order {order}? I bought a {product}."},
            {"role": "assistant", "content": f"Acme support: order {order} ({product}) left our warehouse in "
                                             f"{rng.choice(CITIES)} and arrives in {days} days. Reference CS-{n}."},
        ]
    elif kind == 1:
        messages += [
            {"role": "user", "content": f"I want a refund for my {product}, order {order}."},
            {"role": "assistant", "content": f"Acme support: the refund for order {order} is approved and reaches "
                                             f"your card within 5 working days. Reference CS-{n}."},
            {"role": "user", "content": "Do I need to send it back?"},
            {"role": "assistant", "content": "Acme support: yes, please use the prepaid label we e-mailed you. "
                                             f"Reference CS-{n}."},
        ]
    elif kind == 2:
        p = rng.choice(ZH_PRODUCTS)
        messages += [
            {"role": "user", "content": f"我的{p}坏了，订单号{order}，还在保修期吗？"},
            {"role": "assistant", "content": f"Acme客服：订单{order}的{p}在两年保修期内，我们将免费维修。参考编号 CS-{n}。"},
        ]
    else:
        extra = " ".join(rng.choice(["It is urgent.", "Please hurry.", "Thanks.", "I waited a week."])
                         for _ in range(rng.randint(0, 30)))
        messages += [
            {"role": "user", "content": f"My {product} arrived broken. {extra}"},
            {"role": "assistant", "content": f"Acme support: I am sorry. I am handing you over to a human agent "
                                             f"who will call you today. Reference CS-{n}."},
        ]
    return {"messages": messages}


def write_prepared(folder: Path, *, n_train: int = 120, n_val: int = 24, seed: int = 0) -> Path:
    """A prepared dir as `sovereign finetune prepare` writes it: train.jsonl, val.jsonl, prepare_report.json."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, offset in (("train.jsonl", n_train, 0), ("val.jsonl", n_val, n_train)):
        lines = [json.dumps(conversation(rng, offset + i), ensure_ascii=False) for i in range(count)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "prepare_report.json").write_text(json.dumps({"train_rows": n_train, "val_rows": n_val}) + "\n")
    return folder
