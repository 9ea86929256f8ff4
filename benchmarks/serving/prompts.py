"""A fixed set of realistic customer-service requests: both servers get exactly these, in this order."""

from __future__ import annotations

SYSTEM = ("You are a friendly and concise customer-service assistant for an online electronics shop. "
          "Answer in a few sentences, be polite, and ask for an order number when you need one.")

QUESTIONS = [
    "My order hasn't arrived yet and the tracking page has said 'in transit' for six days. What should I do?",
    "I was charged twice for the same pair of headphones. Can you help me get a refund?",
    "How do I return a laptop that I opened but never used?",
    "Do you ship to Canada, and how long does delivery usually take?",
    "The phone case I received is the wrong colour. I ordered black and got pink.",
    "Can I change the delivery address on an order I placed an hour ago?",
    "My new smartwatch will not turn on even after charging it overnight. Is it covered by the warranty?",
    "What payment methods do you accept? Can I pay in instalments?",
    "I forgot my account password and the reset e-mail never arrives.",
    "Is there a student discount on tablets?",
    "The package was left at the wrong house. The neighbour says it isn't there.",
    "How can I cancel my subscription to your extended warranty plan?",
    "I received a damaged TV: the screen is cracked. What are my options?",
    "Can you tell me whether the 65-inch model supports wall mounting?",
    "I would like to exchange my keyboard for a different layout. Is that possible?",
    "Why was my order cancelled without any explanation?",
]


def messages(i: int) -> list[dict[str, str]]:
    """The i-th request (cycling through the fixed questions)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
