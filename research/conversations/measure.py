"""What should the scorer read of a multi-turn conversation? AUROC of the shipped probes on labelled questions
asked as the last turn of conversations built around them, for each way of rendering the conversation.

Data: GSM8K **train** questions (labels of Qwen2.5-Math-1.5B/7B-Instruct, /work/shared/data), which neither the
shipped GSM8K probes (trained on GSM8K test) nor the MATH pool probes (trained on MATH train) saw. A stratified
sample on the 1.5B model's label (``--per-class`` wrong and as many right answers, seed 0) is the evaluation set;
other training questions, with their reference solutions as the assistant's answers, fill the earlier turns.

Three kinds of conversation end in each evaluated question (``build``):

- ``chat``: an optional system prompt, 1-3 earlier question/answer turns, the question;
- ``tools``: the same with function calling: the earlier answers call a ``calculator`` tool for each of the
  reference solution's ``<<expr=value>>`` steps (assistant tool calls, tool results, then the answer), and the
  question is followed by the assistant's ``search_notes`` call and its result (two other solutions, ~250 tokens),
  as an agent's loop sends it back; the request's ``tools`` (three definitions) travel beside the messages;
- ``split``: 0-2 earlier turns, then the question's setup (all its sentences but the last) as one user turn, a
  short acknowledgement, and its last sentence (the actual question) as the last user turn: a follow-up that
  means nothing without its context.

Renderings (what the scorer reads), all through the gateway's own encoder and feature function
(``router.scorer.prompt.PromptEncoder.view`` / ``render``, ``router.scorer.features.FeatureExtractor``):
``single`` (the question alone, the probes' training distribution: the reference), ``whole`` (today: everything,
cut to the last ``max_prompt_tokens``), ``last_turn``, ``context_N`` (last_turn_with_context with N tokens), and
research-only variants built as message lists and read whole: ``whole+tool_defs`` (the tool definitions as JSON in
the system message, as Qwen2.5's template writes them) and ``last_turn+after`` (the last user message and the tool
call and result after it). Text features (MATH pool probes) read ``prompt_text`` of the same messages.

    .venv/bin/python -m research.conversations.measure --per-class 100      # writes results.json and results.md

Features are cached by token ids under .cache/research/conversations/, so a rerun computes only what is new.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from router import ProbeSet, load_probe, load_settings
from router.scorer import FeatureExtractor, PromptEncoder, resolve_model

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/gsm8k_train_qwen25math.jsonl")
CACHE = ROOT / ".cache" / "research" / "conversations"
SMALL, LARGE = "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
SYSTEMS = [None, None, "You are a helpful math tutor. Solve each problem step by step.",
           "Please reason step by step, and put your final answer within \\boxed{}."]
TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression exactly and return its value.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "description": "An arithmetic expression, e.g. 48/2 or (3+4)*12"}},
            "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "search_notes", "description": "Search the student's course notes for worked examples.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "What to look for"},
            "limit": {"type": "integer", "description": "How many notes to return", "default": 2}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "unit_convert", "description": "Convert a quantity between units (time, money, length, weight).",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}},
]
CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
CONTEXTS = (128, 256, 512)


def clean_solution(solution: str) -> str:
    body, _, answer = solution.partition("####")
    return CALC.sub("", body).strip() + f"\nThe final answer is \\boxed{{{answer.strip()}}}."


def plain_question(row: dict[str, Any]) -> str:
    return row["question"].removesuffix(SUFFIX).strip()


def split_question(question: str) -> tuple[str, str] | None:
    """(the setup, the last sentence) of a question with at least two sentences."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z$0-9])", question)
    if len(sentences) < 2:
        return None
    return " ".join(sentences[:-1]), sentences[-1]


@dataclass
class Conversation:
    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    after_last_user: int = 0  # messages after the last user message (the agent's loop)
    meta: dict[str, Any] = field(default_factory=dict)


def turn(row: dict[str, Any], rng: random.Random, tools: bool) -> list[dict[str, Any]]:
    """One earlier question and its answer (with calculator calls when ``tools``)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": row["question"]}]
    if tools:
        for n, (expr, value) in enumerate(CALC.findall(row["solution"])[:3]):
            call_id = f"call_{row['idx']}_{n}"
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps({"value": value})})
    messages.append({"role": "assistant", "content": clean_solution(row["solution"])})
    return messages


def build(row: dict[str, Any], pool: Sequence[dict[str, Any]], seed: int) -> dict[str, Conversation]:
    rng = random.Random(seed)
    system = rng.choice(SYSTEMS)
    head = [{"role": "system", "content": system}] if system else []
    earlier = rng.sample(list(pool), 3 + 2)
    k = rng.choice([1, 2, 3])
    chat = [*head, *(m for r in earlier[:k] for m in turn(r, rng, False)), {"role": "user", "content": row["question"]}]
    notes = "\n\n".join(f"Note {i + 1}. {plain_question(r)}\n{clean_solution(r['solution'])}"
                        for i, r in enumerate(earlier[3:5]))
    after = [{"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_notes", "type": "function", "function": {
                    "name": "search_notes", "arguments": json.dumps({"query": plain_question(row)[:80]})}}]},
             {"role": "tool", "tool_call_id": "call_notes", "content": notes}]
    tools = [*head, *(m for r in earlier[:k] for m in turn(r, rng, True)),
             {"role": "user", "content": row["question"]}, *after]
    out = {"chat": Conversation("chat", chat, meta={"k": k, "system": bool(system)}),
           "tools": Conversation("tools", tools, TOOLS, after_last_user=len(after), meta={"k": k})}
    parts = split_question(plain_question(row))
    if parts is not None:
        k2 = rng.choice([0, 1, 2])
        split = [*head, *(m for r in earlier[:k2] for m in turn(r, rng, False)),
                 {"role": "user", "content": parts[0]},
                 {"role": "assistant", "content": "Understood. What would you like to know?"},
                 {"role": "user", "content": parts[1] + SUFFIX}]
        out["split"] = Conversation("split", split, meta={"k": k2})
    return out


def with_tool_defs(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool definitions written into the system message, as Qwen2.5's (and the stand-ins') template does."""
    listing = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>\n" + \
        "\n".join(json.dumps(t) for t in tools) + "\n</tools>"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + listing}, *messages[1:]]
    return [{"role": "system", "content": listing}, *messages]


def renderings(conv: Conversation, single: list[dict[str, Any]], encoders: dict[str, PromptEncoder]
               ) -> dict[str, list[dict[str, str]]]:
    """Rendering name → the messages the scorer reads (normalised), each through the gateway's own view."""
    whole = encoders["whole"]
    out = {"single": whole.view(single), "whole": whole.view(conv.messages),
           "last_turn": encoders["last_turn"].view(conv.messages)}
    for n in CONTEXTS:
        out[f"context_{n}"] = encoders[f"context_{n}"].view(conv.messages)
    if conv.tools:
        out["whole+tool_defs"] = whole.view(with_tool_defs(conv.messages, conv.tools))
        last = len(conv.messages) - conv.after_last_user - 1
        head = [m for m in conv.messages[:last] if m["role"] == "system"][:1]
        out["last_turn+after"] = whole.view([*head, *conv.messages[last:]])
    return out


class FeatureCache:
    """Features by token ids (sha256), computed in batches of similar length, saved as it goes."""

    def __init__(self, extractor: FeatureExtractor, folder: Path) -> None:
        self.extractor = extractor
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, np.ndarray] = {}
        for part in sorted(folder.glob("part-*.npz")):
            with np.load(part) as z:
                self.rows.update({k: z[k] for k in z.files})

    @staticmethod
    def key(ids: Sequence[int]) -> str:
        return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:24]

    def compute(self, all_ids: list[list[int]], batch: int = 8, save_every: int = 64) -> None:
        todo = {self.key(ids): ids for ids in all_ids if self.key(ids) not in self.rows}
        order = sorted(todo, key=lambda k: len(todo[k]))
        tokens = sum(len(todo[k]) for k in order)
        print(f"features: {len(order)} to compute ({tokens} tokens), {len(self.rows)} cached", flush=True)
        pending: dict[str, np.ndarray] = {}
        start = time.time()
        done_tokens = 0
        for i in range(0, len(order), batch):
            keys = order[i:i + batch]
            feats = self.extractor.features_from_ids([todo[k] for k in keys])
            for k, f in zip(keys, feats, strict=True):
                pending[k] = f
            done_tokens += sum(len(todo[k]) for k in keys)
            if len(pending) >= save_every or i + batch >= len(order):
                np.savez(self.folder / f"part-{int(time.time() * 1000)}.npz", **pending)
                self.rows.update(pending)
                pending = {}
                rate = done_tokens / (time.time() - start)
                print(f"  {i + len(keys)}/{len(order)} prompts, {rate:.0f} tokens/s, "
                      f"{(tokens - done_tokens) / rate / 60:.0f} min left", flush=True)

    def __getitem__(self, ids: Sequence[int]) -> np.ndarray:
        return self.rows[self.key(ids)]


def bootstrap_delta(y: np.ndarray, p: np.ndarray, ref: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """95% interval of AUROC(p) − AUROC(ref) over questions resampled with replacement (paired)."""
    rng = np.random.default_rng(seed)
    deltas = []
    n = len(y)
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        if y[idx].min() == y[idx].max():
            continue
        deltas.append(roc_auc_score(y[idx], p[idx]) - roc_auc_score(y[idx], ref[idx]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--skip", nargs="*", default=[], metavar="KIND:RENDERING",
                        help="renderings not to compute, e.g. tools:whole+tool_defs chat:context_128")
    args = parser.parse_args()

    rows = [json.loads(line) for line in DATA.open()]
    rng = random.Random(args.seed)
    wrong = [r for r in rows if r["correct"][SMALL] == 0]
    right = [r for r in rows if r["correct"][SMALL] == 1]
    sample = rng.sample(wrong, args.per_class) + rng.sample(right, args.per_class)
    chosen = {r["idx"] for r in sample}
    pool = [r for r in rows if r["idx"] not in chosen and CALC.search(r["solution"])]

    settings = load_settings(ROOT / "config.yaml")
    cfg = settings.scorer.model_copy(update={"pooling": "last+mean"})  # [last ‖ mean] of block 15: both probe kinds
    extractor = FeatureExtractor(cfg)
    model_dir = resolve_model(cfg.model, cfg.cache_dir).path
    encoders = {"whole": extractor.encoder}
    for name, mode, n in [("last_turn", "last_turn", 0), *((f"context_{n}", "last_turn_with_context", n)
                                                           for n in CONTEXTS)]:
        encoders[name] = PromptEncoder(model_dir, cfg.max_prompt_tokens, conversation=mode, context_tokens=n)

    items = []  # (row, kind, rendering name, messages, ids)
    for row in sample:
        convs = build(row, pool, seed=args.seed * 100_003 + row["idx"])
        single = [{"role": "user", "content": row["question"]}]
        for kind, conv in convs.items():
            for name, messages in renderings(conv, single, encoders).items():
                if f"{kind}:{name}" in args.skip:
                    continue
                items.append((row, kind, name, messages, extractor.encoder.encode(messages)))
    cache = FeatureCache(extractor, CACHE / extractor.info.fingerprint)
    cache.compute([ids for *_, ids in items])

    probes = {
        "gsm8k-1.5b": (ProbeSet(["p"], [load_probe(ROOT / "artifacts/probes/qwen2.5-math-1.5b.json")]), SMALL, 576),
        "gsm8k-7b": (ProbeSet(["p"], [load_probe(ROOT / "artifacts/probes/qwen2.5-math-7b.json")]), LARGE, 576),
        "math-pool-1.5b": (ProbeSet(["p"], [load_probe(ROOT / "artifacts/probes/math-pool/qwen2.5-math-1.5b.json")]),
                           SMALL, 1152),
        "math-pool-7b": (ProbeSet(["p"], [load_probe(ROOT / "artifacts/probes/math-pool/qwen2.5-math-7b.json")]),
                         LARGE, 1152),
    }
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    for row, kind, name, messages, ids in items:
        x = cache[ids]
        preds = {pname: ps.predict(x[:width], messages)["p"] for pname, (ps, _, width) in probes.items()}
        table.setdefault((kind, name), {})[row["idx"]] = preds
        tokens.setdefault((kind, name), []).append(len(ids))

    results = []
    idxs = [r["idx"] for r in sample]
    for pname, (_, label, _) in probes.items():
        for (kind, name), by_row in sorted(table.items()):
            ids_here = [i for i in idxs if i in by_row]
            yk = np.array([r["correct"][label] for r in sample if r["idx"] in by_row])
            p = np.array([by_row[i][pname] for i in ids_here])
            r0 = np.array([table[(kind, "single")][i][pname] for i in ids_here])
            auc, auc0 = roc_auc_score(yk, p), roc_auc_score(yk, r0)
            lo, hi = bootstrap_delta(yk, p, r0, args.bootstrap, args.seed) if name != "single" else (0.0, 0.0)
            results.append({"probe": pname, "label": label, "kind": kind, "rendering": name, "n": len(yk),
                            "auroc": round(float(auc), 4),
                            "delta_vs_single": round(float(auc - auc0), 4),
                            "delta_ci95": [round(lo, 4), round(hi, 4)],
                            "mean_abs_shift_p": round(float(np.mean(np.abs(p - r0))), 4),
                            "mean_p": round(float(p.mean()), 4),
                            "mean_tokens": round(float(np.mean(tokens[(kind, name)])), 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "n_questions": len(sample), "results": results}, indent=1))
    lines = ["| probe | conversation | rendering | tokens | AUROC | Δ vs single [95% CI] | mean abs shift of p |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ci = f"{r['delta_vs_single']:+.3f} [{r['delta_ci95'][0]:+.3f}, {r['delta_ci95'][1]:+.3f}]" \
            if r["rendering"] != "single" else "(reference)"
        lines.append(f"| {r['probe']} | {r['kind']} | {r['rendering']} | {r['mean_tokens']:.0f} | {r['auroc']:.3f} "
                     f"| {ci} | {r['mean_abs_shift_p']:.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
