"""The figures behind tool calling and embeddings, on the real instruct model, in one process (no server).

1. Pooling: a small retrieval set (each query has one relevant passage among all of them) embedded with mean and
   with last-token pooling; top-1 accuracy and mean reciprocal rank of the right passage by cosine similarity.
2. `tool_choice: auto`: how many of a fixed set of prompts that need a tool get a call back (greedy).
3. The cost of a grammar-constrained call: tokens/s of `required` and named calls against unconstrained greedy
   decoding of the same prompts, one request at a time.

    .venv/bin/python -m bench.agents [--model /work/models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.real import GGUF_CACHE, REAL_MODEL
from llmapi.engine.toolcalls import CallStart, read_all
from llmapi.engine.types import EmbeddingRequest, GenerationRequest

# (query, its relevant passage): every passage is a candidate for every query.
RETRIEVAL = [
    ("How do I reset my password?", "To change a forgotten password, click 'Forgot password' on the login page."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How tall is Mount Everest?", "Mount Everest rises 8,849 metres above sea level."),
    ("When did World War II end?", "The Second World War ended in 1945 with the surrender of Japan."),
    ("What do pandas eat?", "Giant pandas feed almost entirely on bamboo shoots and leaves."),
    ("How does photosynthesis work?", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote the tragedy Romeo and Juliet around 1595."),
    ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius."),
    ("How many legs does a spider have?", "Spiders are arachnids with eight legs."),
    ("What is Python used for?", "Python is a programming language used for web servers, data science and scripts."),
    ("How far is the Moon?", "The Moon orbits about 384,000 kilometres from the Earth."),
    ("What causes rain?", "Water vapour in clouds condenses into droplets that fall as rain."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early 1500s."),
    ("How do vaccines work?", "A vaccine trains the immune system to recognise a germ before an infection."),
    ("What is the largest ocean?", "The Pacific is the largest and deepest of the Earth's oceans."),
    ("How do I cook rice?", "Rinse the rice, boil it in twice its volume of water, then simmer covered."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second in a vacuum."),
    ("How many players are on a football team?", "A soccer team fields eleven players, one of them the goalkeeper."),
    ("What is inflation?", "Inflation is the rise of prices over time, which lowers what money can buy."),
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string"},
                "to_currency": {"type": "string"},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]
NEEDS_A_TOOL = [
    "What is the weather like in Paris today?",
    "Tell me the current weather in Tokyo.",
    "Is it raining in London right now?",
    "I need the weather forecast for Berlin.",
    "How warm is it in Madrid at the moment?",
    "Convert 100 US dollars to euros.",
    "How many yen is 50 pounds?",
    "Please convert 20 euros into Swiss francs.",
    "Check the weather in New York for me.",
    "What's 300 Canadian dollars in US dollars?",
]
RIGHT_TOOL = ["get_weather"] * 5 + ["convert_currency"] * 3 + ["get_weather", "convert_currency"]


def cosine_ranks(queries: list[list[float]], passages: list[list[float]]) -> list[int]:
    """The rank (1 = first) of each query's own passage among all passages, by dot product of unit vectors."""
    ranks = []
    for i, query in enumerate(queries):
        scores = [sum(q * p for q, p in zip(query, passage)) for passage in passages]
        ranks.append(1 + sum(score > scores[i] for score in scores))
    return ranks


def pooling(engine: Any) -> None:
    """Top-1 and MRR of mean and last-token pooling on RETRIEVAL."""
    for how in ("mean", "last"):
        embed = [engine.embed(EmbeddingRequest(text=q, pooling=how)) for q, _ in RETRIEVAL]
        queries = [list(row.result().embedding) for row in embed]
        embed = [engine.embed(EmbeddingRequest(text=p, pooling=how)) for _, p in RETRIEVAL]
        passages = [list(row.result().embedding) for row in embed]
        ranks = cosine_ranks(queries, passages)
        top1 = sum(rank == 1 for rank in ranks) / len(ranks)
        mrr = sum(1 / rank for rank in ranks) / len(ranks)
        print(f"pooling {how}: top-1 {top1:.2f}, MRR {mrr:.3f} over {len(ranks)} queries")


def prompt(engine: Any, ask: str) -> str:
    """The chat prompt of one question with the tools (the model's template, or the generic tool prompt)."""
    return engine.render_chat([{"role": "user", "content": ask}], TOOLS)


def auto_rate(engine: Any, max_tokens: int) -> None:
    """How often greedy `auto` answers with a call on NEEDS_A_TOOL."""
    called = 0
    for ask in NEEDS_A_TOOL:
        text = engine.generate(GenerationRequest(prompt=prompt(engine, ask), max_new_tokens=max_tokens)).text
        called += any(isinstance(event, CallStart) for event in read_all(text))
    print(f"auto: {called} of {len(NEEDS_A_TOOL)} prompts that need a tool got a call")


def constrained_cost(engine: Any, max_tokens: int) -> None:
    """Tokens/s of required and named calls against unconstrained decoding, one request at a time."""
    from llmapi.http.openai.tools import plan

    choices: list[tuple[str, Any]] = [("required", "required"), ("named", {"name": "get_weather"}), ("free", "none")]
    engine.generate(GenerationRequest(prompt=prompt(engine, "warm up"), max_new_tokens=4))
    for label, choice in choices:
        grammar = plan({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": True}).grammar
        tokens, seconds, right = 0, 0.0, 0
        for ask, tool in zip(NEEDS_A_TOOL, RIGHT_TOOL):
            request = GenerationRequest(prompt=prompt(engine, ask), max_new_tokens=max_tokens, grammar=grammar)
            started = time.perf_counter()
            result = engine.generate(request)
            seconds += time.perf_counter() - started
            tokens += result.completion_tokens
            right += [e.name for e in read_all(result.text) if isinstance(e, CallStart)][:1] == [tool]
        rate = f"{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s (prefill included)"
        print(f"{label}: {rate}; the right tool first on {right} of {len(NEEDS_A_TOOL)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REAL_MODEL), help="default: the GGUF file `make real-model` gets")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-pooling", action="store_true", help="skip the retrieval measurement")
    args = parser.parse_args()
    from llmapi.engine import create_engine

    engine = create_engine(
        args.model, torch_threads=2, max_batch_size=8, batch_wait_ms=5, gguf_cache_dir=str(GGUF_CACHE)
    )
    if not args.no_pooling:
        pooling(engine)
    auto_rate(engine, args.max_tokens)
    constrained_cost(engine, args.max_tokens)
    engine.close()


if __name__ == "__main__":
    main()
