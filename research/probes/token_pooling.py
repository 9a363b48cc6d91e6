"""Research screen (not part of the package): which of the prompt's token positions a block-15 probe should pool
(2026-12-06).

The shipped pooling reads block 15 at the last token and/or averages it over *every* token, the chat template's
shared opening (SmolLM2's default system prompt, 23 tokens, identical for every prompt) included. That mean is
(P·c + n·q)/(P + n): the question's own mean q shrunk by a length-dependent factor towards a constant c, which
a linear probe cannot undo. This screen measures other poolings of the same pass, paired on the same questions
through the probe pipeline's own protocol (``probes.evaluate.held_out``, as ``paired.py``):

- ``mean_q``: the mean over the tokens after the shared opening (question and the template's closing tokens);
- ``mean_body``: the same without the closing tokens (``<|im_end|>``, ``<|im_start|>assistant`` …);
- ``max_body``: the maximum over the body, per dimension;
- ``suf1`` … ``sufS``: each closing token's state (``sufS`` is the last token, the shipped ``last``).

Usage, from the repository root:
    .venv/bin/python research/probes/token_pooling.py extract DATA.jsonl OUT.npy
    .venv/bin/python research/probes/token_pooling.py paired --config C --data DATA.jsonl --features OUT.npy \
        --recipe base=last+mean_all:tfidf+length --recipe q=last+mean_q:tfidf+length [--share-labels [all]] \
        [--train-labels B=K+K] [--test TEST.jsonl --test-features TEST.npy] [--folds 3] [--tokens math]
    .venv/bin/python research/probes/token_pooling.py text DATA.jsonl words math chars

``extract`` runs transformers' padded pass of the gateway's scorer (config.yaml's model, block 15, the final
norm applied, bf16 as the gateway computes) over batches of 8 prompts sorted by length, and writes every
variant's 576 columns side by side (names and offsets in OUT.json). Its ``last`` and ``mean_all`` are the
shipped ``last+mean`` features up to bf16 rounding (the script prints the largest difference on the first
batch). ``paired`` prints one JSON line per recipe: AUROC per backend and the difference from the first recipe
with a 95% paired-bootstrap interval; ``--tokens math`` has the probe's TF-IDF read LaTeX commands, single
letters, digits and symbols as tokens (``MATH_TOKENS``) in place of the pipeline's words of two or more
characters. ``text`` screens the tokenisations for a text-only model (TF-IDF + logistic, C by inner CV, outer
KFold(3, seed 0)) on the MATH file's two 1.5B models: ``words`` (the pipeline's), ``math``, ``chars`` (character
2-5-grams within words).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from paired import per_backend  # this folder's paired.py (the script's folder is on sys.path)
from sklearn.metrics import roc_auc_score

from probes import Inputs, labelled_backends, load_dataset, shared_keys
from router import load_settings, prompt_text
from router.scorer import configure_openmp

BLOCK = 15
MATH_TOKENS = r"\\[A-Za-z]+|\w+|[^\w\s]"
TOKENISATIONS = {
    "words": {"token_pattern": r"(?u)\b\w\w+\b", "ngram_range": (1, 2), "max_features": 20000},
    "math": {"token_pattern": MATH_TOKENS, "ngram_range": (1, 2), "max_features": 20000},
    "chars": {"analyzer": "char_wb", "ngram_range": (2, 5), "max_features": 50000},
}


def closing_length(encoder) -> int:
    """How many tokens every one-message prompt ends with (the template's closing and generation prompt)."""
    a, b = (encoder.encode([{"role": "user", "content": t}]) for t in ("1", "Why?"))
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    return common


@torch.inference_mode()
def extract(data_path: str, out: str) -> None:
    from router.scorer import FeatureExtractor

    settings = load_settings("config.yaml")
    configure_openmp(settings.scorer)
    cfg = settings.scorer.model_copy(update={"layers": [BLOCK], "pooling": "last+mean"})
    fx = FeatureExtractor(cfg)
    prefix = fx.encoder.shared_prefix()
    p_len, s_len = len(prefix), closing_length(fx.encoder)
    names = ["last", "mean_all", "mean_q", "mean_body", "max_body", *[f"suf{k}" for k in range(1, s_len + 1)]]
    print(f"shared opening {p_len} tokens, closing {s_len}; variants {names}", flush=True)
    data = load_dataset(data_path)
    ids = [fx.encoder.encode(c) for c in data.conversations()]
    width = fx.info.hidden_size
    x = np.zeros((len(ids), width * len(names)), dtype=np.float32)
    order = np.argsort([len(i) for i in ids], kind="stable")
    start = time.time()
    for first in range(0, len(order), 8):
        rows = order[first:first + 8]
        batch = [ids[r] for r in rows]
        n_max = max(len(i) for i in batch)
        input_ids = torch.full((len(batch), n_max), fx.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n_max), dtype=torch.long)
        for j, seq in enumerate(batch):
            input_ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        states = fx.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = fx.final_norm(states[BLOCK]).to(torch.float32)
        for j, seq in enumerate(batch):
            n = len(seq)
            t = h[j, :n]
            q0 = p_len if seq[:p_len] == prefix else 0  # a prompt cut to max_prompt_tokens lost its opening
            body = t[q0:max(n - s_len, q0 + 1)]
            parts = [t[-1], t.mean(0), t[q0:].mean(0), body.mean(0), body.max(0).values,
                     *[t[n - s_len + k] for k in range(s_len)]]
            x[rows[j]] = torch.cat(parts).numpy()
        if first == 0:
            shipped = fx.features_from_ids(batch)  # the gateway's own pass: last then mean
            print("largest |difference| from the shipped features on the first batch:",
                  float(np.abs(shipped - x[rows][:, :2 * width]).max()), flush=True)
        if first % 800 == 0:
            print(f"{first}/{len(ids)} {time.time() - start:.0f} s", flush=True)
    np.save(out, x)
    Path(out.removesuffix(".npy") + ".json").write_text(json.dumps(
        {"names": names, "width": width, "shared_opening": p_len, "closing": s_len, "tokens": [len(i) for i in ids]}))
    print(x.shape, f"{time.time() - start:.0f} s", flush=True)


def columns(meta: dict, spec: str) -> np.ndarray:
    w = meta["width"]
    return np.concatenate([np.arange(meta["names"].index(v) * w, (meta["names"].index(v) + 1) * w)
                           for v in spec.split("+")])


def paired(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--test")
    p.add_argument("--test-features")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=VAR+VAR:TEXT")
    p.add_argument("--train-labels", action="append", default=[], metavar="BACKEND=KEY[+KEY...]")
    p.add_argument("--share-labels", nargs="?", const="backends", choices=["backends", "all"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--tokens", choices=["words", "math"], default="words")
    args = p.parse_args(argv)
    if args.tokens == "math":  # the probe's TF-IDF, fitted (probes.fit) and applied (router.text_features)
        import re

        import probes.fit  # private on purpose: this screen patches the token pattern it fits with
        import router.text_features  # private on purpose: and the one it applies
        router.text_features._TOKEN = re.compile(MATH_TOKENS)
        probes.fit.TOKEN_PATTERN = MATH_TOKENS
    settings = load_settings(args.config)
    data = load_dataset(args.data)
    test = load_dataset(args.test) if args.test else None
    scored = test or data
    meta = json.loads(Path(args.features.removesuffix(".npy") + ".json").read_text())
    feats = np.load(args.features, mmap_mode="r")
    test_feats = np.load(args.test_features, mmap_mode="r") if test else None
    keys: dict[str, list[str]] = {}
    if args.share_labels == "all":
        keys = {b.name: data.label_sets() for b in settings.backends}
    elif args.share_labels:
        keys = shared_keys(settings, data, {})
    keys |= {i.split("=", 1)[0]: i.split("=", 1)[1].split("+") for i in args.train_labels}
    backends = labelled_backends(settings, data, {})
    texts = tuple(prompt_text(c) for c in data.conversations())
    test_texts = tuple(prompt_text(c) for c in test.conversations()) if test else None
    rng = np.random.default_rng(args.seed)
    resamples = [rng.integers(0, len(scored.records), len(scored.records)) for _ in range(args.bootstrap)]
    first: dict[str, np.ndarray] = {}
    for spec in args.recipe:
        name, rest = spec.split("=", 1)
        variants, text = rest.split(":")
        cols = columns(meta, variants)
        x = np.asarray(feats[:, cols], dtype=np.float64)
        x_test = None if test is None else np.asarray(test_feats[:, cols], dtype=np.float64)
        if text != "none":
            x = Inputs(x, texts)
            x_test = None if test is None else Inputs(x_test, test_texts)
        start = time.time()
        row: dict[str, object] = {"recipe": name, "reads": rest}
        row |= per_backend(x, x_test, text, data=data, scored=scored, backends=backends, keys=keys,
                           folds=args.folds, seed=args.seed, first=first, resamples=resamples)
        row["s"] = round(time.time() - start)
        print(json.dumps(row), flush=True)


def text_screen(data_path: str, names: list[str]) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    data = load_dataset(data_path)
    texts = [prompt_text(c) for c in data.conversations()]
    for name in names:
        start, row = time.time(), {"tokens": name}
        for model in ("Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"):
            y, pred = data.labels(model), np.zeros(len(texts))
            for train, test in KFold(3, shuffle=True, random_state=0).split(texts):
                vec = TfidfVectorizer(min_df=2, sublinear_tf=True, **TOKENISATIONS[name])
                xt = vec.fit_transform([texts[i] for i in train])
                best = (-1.0, 1.0)
                for c in (0.3, 1.0, 3.0, 10.0):
                    oof = np.zeros(len(train))
                    for a, b in KFold(3, shuffle=True, random_state=0).split(train):
                        oof[b] = LogisticRegression(C=c, max_iter=2000).fit(xt[a], y[train][a]).decision_function(xt[b])
                    best = max(best, (roc_auc_score(y[train], oof), c))
                model_fit = LogisticRegression(C=best[1], max_iter=2000).fit(xt, y[train])
                pred[test] = model_fit.decision_function(vec.transform([texts[i] for i in test]))
            row[model.split("/")[1]] = round(roc_auc_score(y, pred), 4)
        print(json.dumps(row | {"s": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        extract(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "text":
        text_screen(sys.argv[2], sys.argv[3:])
    else:
        paired(sys.argv[2:])
