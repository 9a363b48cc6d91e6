"""Research scan (not part of the package). Usage, from the repository root:
    .venv/bin/python research/probes/scan.py '[[[15],"last"],[[15],"mean"]]' y1,y7,both

Scan recipes by plain 5-fold CV (seed 0): for each recipe and C, OOF logits from models trained on a label
set; AUROC against 1.5B and 7B targets."""
import json
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from probes import DEFAULT_CS, StandardisedLogistic, extract_features, load_dataset
from router import load_settings

ds = load_dataset("data/gsm8k_test_qwen25math.jsonl")

_cfg = load_settings("config.yaml").scorer.model_copy(update={"layers": list(range(1, 31)), "pooling": "last+mean"})
X = extract_features(_cfg, ds)[0]  # every layer, last and mean, through the gateway's feature function (cached)
m1, m7 = "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"
y1, y7 = ds.labels(m1), ds.labels(m7)
H = 576
def cols(layers, pooling):
    kinds = {"last": [0], "mean": [1], "last+mean": [0, 1]}[pooling]
    return np.concatenate([np.arange(H) + ((layer - 1) * 2 + k) * H for layer in layers for k in kinds])
def scan(layers, pooling, trainsets):
    x = np.asarray(X[:, cols(layers, pooling)], dtype=np.float64)
    res = {}
    for tname, ys in trainsets.items():
        oof = np.zeros((len(DEFAULT_CS), len(y1)))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y1):
            path = StandardisedLogistic().fit_path(x[tr], [y[tr] for y in ys], DEFAULT_CS)
            for j, s in enumerate(path):
                oof[j, te] = s.decision(x[te])
        for target, yt in (("1.5B", y1), ("7B", y7)):
            aucs = [roc_auc_score(yt, o) for o in oof]
            j = int(np.argmax(aucs))
            res[f"{tname}->{target}"] = (round(aucs[j], 4), DEFAULT_CS[j])
    return res
grid = json.loads(sys.argv[1])
trainsets = {"y1": [y1], "y7": [y7], "both": [y1, y7]}
for layers, pooling in grid:
    t = time.time()
    r = scan(layers, pooling, {k: trainsets[k] for k in sys.argv[2].split(",")})
    row = {"layers": layers, "pooling": pooling, **r, "s": round(time.time() - t)}
    print(json.dumps(row), flush=True)
