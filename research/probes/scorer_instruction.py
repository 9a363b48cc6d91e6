"""Research screen (not part of the package): does telling the scorer what it is reading for make its state
predict failures better (issue 12; 2026-12-06)?

SmolLM2's chat template opens every prompt that has no system message with its default one ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face"). The scorer computes that opening once (the shared prefix,
router/scorer/packed.py), so a different system message costs the routed path nothing per request. This screen
replaces it with an instruction about the task the probe reads the state for, or appends such an instruction to
the question (which does cost tokens per request), and measures the block-15 last+mean features of each variant
through the probe pipeline's protocol, paired on the same questions (``token_pooling.py paired``).

Variants (``VARIANTS``): ``none`` (the shipped prompt), ``blank`` (an empty system message: no opening text),
``judge`` and ``expert`` (a system message asking to judge whether a small model would answer correctly / how
hard the problem is), ``ask`` (the shipped opening, and a question appended to the user's message).

Usage, from the repository root:
    .venv/bin/python research/probes/scorer_instruction.py DATA.jsonl OUT.npy [VARIANT ...]
    .venv/bin/python research/probes/token_pooling.py paired --data DATA.jsonl --features OUT.npy \
        --recipe none=last_none+mean_none:none --recipe judge=last_judge+mean_judge:none [--folds 3] ...

Writes every variant's last and mean columns side by side (names in OUT.json, as ``token_pooling.py`` reads them)
and prints each variant's prefix length, mean tokens a prompt and prompts/s of the packed pass.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from probes import load_dataset
from router import load_settings
from router.scorer import FeatureExtractor, configure_openmp

BLOCK = 15
JUDGE = ("You judge questions before a small AI model answers them. Read the question and decide whether the "
         "model will answer it correctly: how many steps it takes, how much it must know, where it could go wrong.")
EXPERT = "You are an expert mathematician. Read the problem and judge how hard it is to solve correctly."
ASK = "\n\nWill a small AI model answer this correctly?"
VARIANTS = {
    "none": (None, ""),
    "blank": ("", ""),
    "judge": (JUDGE, ""),
    "expert": (EXPERT, ""),
    "ask": (None, ASK),
}


def conversation(question: str, variant: str) -> list[dict[str, str]]:
    system, suffix = VARIANTS[variant]
    opening = [] if system is None else [{"role": "system", "content": system}]
    return [*opening, {"role": "user", "content": question + suffix}]


def shared_prefix(fx: FeatureExtractor, variant: str) -> list[int]:
    """The ids every prompt of ``variant`` starts with, less the last (as ``PromptEncoder.shared_prefix``)."""
    a, b = (fx.encoder.encode(conversation(q, variant)) for q in ("1", "Why?"))
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return a[:max(common - 1, 0)]


@torch.inference_mode()
def main(data_path: str, out: str, variants: list[str]) -> None:
    settings = load_settings("config.yaml")
    configure_openmp(settings.scorer)
    fx = FeatureExtractor(settings.scorer.model_copy(update={"layers": [BLOCK], "pooling": "last+mean"}))
    assert fx.packed is not None
    data = load_dataset(data_path)
    width = fx.info.hidden_size
    names = [f"{kind}_{v}" for v in variants for kind in ("last", "mean")]
    x = np.zeros((len(data.questions), width * len(names)), dtype=np.float32)
    stats = {}
    for k, variant in enumerate(variants):
        prefix = shared_prefix(fx, variant)
        fx.packed.prefix = fx.packed.prefix_state(prefix) if prefix else None
        ids = [fx.encoder.encode(conversation(q, variant)) for q in data.questions]
        if variant == "none":  # the shipped prompt: the gateway's own encoding
            assert ids == [fx.encoder.encode(c) for c in data.conversations()]
        order = np.argsort([len(i) for i in ids], kind="stable")
        start = time.time()
        for first in range(0, len(order), 8):
            rows = order[first:first + 8]
            x[rows, 2 * k * width:(2 * k + 2) * width] = fx.features_from_ids([ids[r] for r in rows])
        seconds = time.time() - start
        stats[variant] = {"prefix_tokens": len(prefix),
                          "tokens_per_prompt": round(float(np.mean([len(i) for i in ids])), 1),
                          "prompts_per_s": round(len(ids) / seconds, 1)}
        print(json.dumps({"variant": variant} | stats[variant]), flush=True)
    np.save(out, x)
    Path(out.removesuffix(".npy") + ".json").write_text(json.dumps({"names": names, "width": width, "stats": stats}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(VARIANTS))
