"""How long the scorer's prompts are: each file's questions through the configured scorer's chat template.

``python -m research.perf.prompt_lengths [--config config.yaml] FILE.jsonl ...`` prints, per file (JSONL with a
"question" field), the number of questions, the percentiles of their token counts as the scorer sees them (one
user message, cut at ``scorer.max_prompt_tokens``) and the shares longer than 128, 256 and 512 tokens: what
``scorer.chunk_above_tokens`` leaves whole (research/perf/chunked-passes.md). Loads the tokenizer only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from router import load_settings
from router.scorer import PromptEncoder, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m research.perf.prompt_lengths", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    cfg = load_settings(args.config).scorer
    folder = resolve_model(cfg.model, cfg.cache_dir)
    encoder = PromptEncoder(folder.path, cfg.max_prompt_tokens, conversation=cfg.conversation,
                            context_tokens=cfg.context_tokens)
    for path in args.files:
        rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
        tokens = np.array([len(encoder.encode([{"role": "user", "content": row["question"]}])) for row in rows])
        print(json.dumps({
            "file": str(path), "questions": len(tokens),
            "percentiles": {str(p): int(np.percentile(tokens, p)) for p in (50, 90, 99, 100)},
            "longer_than": {str(t): round(float((tokens > t).mean()), 4) for t in (128, 256, 512)},
        }))


if __name__ == "__main__":
    main()
