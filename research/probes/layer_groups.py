"""Research screen (not part of the package): MATH probes that read several scorer blocks, each block its own
probe, stacked with TF-IDF and length (2026-12-05).

The shipped multi-source probe (``probes.fit``) joins its activation columns into one standardised logistic
model with one C. This screen asks whether giving each block its own probe (its own C by inner CV) and letting a
small logistic combiner weigh the blocks, TF-IDF and the standardised log word count reads more out of the same
activations, and whether more shared label sets help. Protocol: KFold(3, seed 0) outer, KFold(3) inner for every
C, all fits on the stacked shared labels (the LABELS set below, as ``--share-labels`` with the k = 50 success
rates), AUROC per model on its greedy labels, out of fold.

Usage, from the repository root:
    .venv/bin/python research/probes/layer_groups.py extract ../shared/data/math_train_pool.jsonl /tmp/math_all.npy
    .venv/bin/python research/probes/layer_groups.py screen /tmp/math_all.npy joint6_15=joint:6,15 sep6_15=6,15
    LABELS=all .venv/bin/python research/probes/layer_groups.py screen /tmp/math_all.npy joint6_15=joint:6,15

``extract`` writes blocks 1-15, last and mean pooling, through the gateway's feature function (7,500 x 17,280
float32, 196 s on 2 AMX cores). Each screen recipe is NAME=B1,B2 (one probe per block) or NAME=joint:B1,B2 (one
probe over the blocks' columns joined). Prints one JSON line per recipe; results in ``layer_groups.jsonl``.
"""
import json
import os
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from probes import SparseLogistic, StandardisedLogistic, fit_text_features, load_dataset, stack_as_weights
from router import prompt_text

DATA = "../shared/data/math_train_pool.jsonl"
WIDTH = 1152  # per block: last token (576) then mean (576)
MODELS = ["Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct",
          "Qwen/Qwen2.5-7B-Instruct"]
SHARED_GRADED = [f"Qwen/Qwen2.5-Math-1.5B-Instruct@k50_T{t}" for t in ("0.6", "0.7", "1.0")] \
    + ["Qwen/Qwen2.5-1.5B-Instruct@k50_T1.0"] \
    + [f"Qwen/Qwen2.5-Math-7B-Instruct@k50_T{t}" for t in ("0.6", "0.7", "1.0")] \
    + [f"Qwen/Qwen2.5-7B-Instruct@k50_T{t}" for t in ("0.6", "1.0")] + MODELS
LABELS = {
    "shared-graded": SHARED_GRADED,
    "plus": [*SHARED_GRADED, "Qwen/Qwen2-1.5B-Instruct@k50_T0.6", "Qwen/Qwen2-1.5B-Instruct@k50_T1.0",
             "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen3-4B-Instruct-2507", "openai/gpt-oss-20b@k8_T1.0"],
}
# the activation probe's C grid (env CS overrides it)
CS = tuple(float(c) for c in os.environ.get("CS", "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2").split(","))
TEXT_CS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def extract(data_path: str, out: str) -> None:
    from probes import probe_inputs
    from router import load_settings
    from router.scorer import configure_openmp

    settings = load_settings("config.yaml")
    configure_openmp(settings.scorer)
    cfg = settings.scorer.model_copy(update={"layers": list(range(1, 16)), "pooling": "last+mean"})
    start = time.time()
    x, _ = probe_inputs(cfg, load_dataset(data_path), "none", progress=False)
    print(x.shape, round(time.time() - start), "s", flush=True)
    np.save(out, x.astype(np.float32))


def columns(blocks: list[int]) -> np.ndarray:
    return np.concatenate([np.arange((b - 1) * WIDTH, b * WIDTH) for b in blocks])


class Screen:
    def __init__(self, features: str, label_set: str):
        self.x = np.load(features, mmap_mode="r")
        data = load_dataset(DATA)
        self.texts = [prompt_text(c) for c in data.conversations()]
        self.label_set = label_set
        every = [*sorted(data.records[0]["success_rate"]), *MODELS, "Qwen/Qwen2-1.5B-Instruct",
                 "Qwen/Qwen3-4B-Instruct-2507"]  # "all": every label set of the file
        keys = LABELS.get(label_set, every)
        self.ys = [data.training_labels(k) for k in keys]
        self.targets = {m: data.labels(m) for m in MODELS}
        self.log_words = np.log1p(np.array([len(t.split()) for t in self.texts], dtype=float))

    def source_logits(self, groups, train, test, inner):
        """Per source (each block group, then TF-IDF): inner out-of-fold logits on train and logits on test,
        for every C."""
        out = []
        for g in groups:
            x = np.asarray(self.x[:, g], dtype=np.float64)
            oof = np.zeros((len(CS), len(train)))
            for a, b in inner:
                for j, s in enumerate(StandardisedLogistic().fit_path(x[train[a]], [y[train[a]] for y in self.ys], CS)):
                    oof[j, b] = s.decision(x[train[b]])
            path = StandardisedLogistic().fit_path(x[train], [y[train] for y in self.ys], CS)
            out.append((oof, np.stack([s.decision(x[test]) for s in path])))

        def tfidf(fit_rows, score_rows):
            tf = fit_text_features([self.texts[i] for i in fit_rows], length=True)
            v = len(tf.vocabulary)
            path = SparseLogistic().fit_path(tf.sparse([self.texts[i] for i in fit_rows])[:, :v],
                                             [y[fit_rows] for y in self.ys], TEXT_CS)
            m = tf.sparse([self.texts[i] for i in score_rows])[:, :v]
            return [s.decision(m) for s in path]

        oof = np.zeros((len(TEXT_CS), len(train)))
        for a, b in inner:
            oof[:, b] = np.stack(tfidf(train[a], train[b]))
        out.append((oof, np.stack(tfidf(train, test))))
        return out

    def run(self, name: str, groups, folds: int = 3, seed: int = 0) -> dict:
        start = time.time()
        n = len(self.texts)
        preds = {m: np.zeros(n) for m in MODELS}
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(np.zeros(n)):
            inner = list(KFold(3, shuffle=True, random_state=seed).split(train))
            sources = self.source_logits(groups, train, test, inner)
            mu, sd = self.log_words[train].mean(), self.log_words[train].std()
            for m in MODELS:
                y = self.targets[m][train]
                z_train, z_test = [], []
                for oof, scored in sources:  # each source at its own best C for this model
                    j = int(np.argmax([np.mean([roc_auc_score(y[b], oof[j, b]) for _, b in inner])
                                       for j in range(len(oof))]))
                    z_train.append(oof[j])
                    z_test.append(scored[j])
                z_train.append((self.log_words[train] - mu) / sd)
                z_test.append((self.log_words[test] - mu) / sd)
                rows, yy, ww = stack_as_weights([v[train] for v in self.ys])
                combiner = LogisticRegression(C=1e4, max_iter=2000).fit(
                    np.column_stack(z_train)[rows], yy, sample_weight=ww)
                preds[m][test] = np.column_stack(z_test) @ combiner.coef_[0]
        row = {"recipe": name, "labels": self.label_set, "s": round(time.time() - start)}
        return row | {m.split("/")[1]: round(roc_auc_score(self.targets[m], preds[m]), 4) for m in MODELS}


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        extract(sys.argv[2], sys.argv[3])
    else:
        screen = Screen(sys.argv[2], os.environ.get("LABELS", "shared-graded"))
        for spec in sys.argv[3:]:
            name, blocks = spec.split("=")
            joint = blocks.startswith("joint:")
            numbers = [int(v) for v in blocks.removeprefix("joint:").split(",")]
            groups = [columns(numbers)] if joint else [columns([b]) for b in numbers]
            print(json.dumps(screen.run(name, groups)), flush=True)
