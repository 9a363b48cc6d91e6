"""``python -m probes calibrate``: pick the gateway's threshold for a target on out-of-fold estimates and
write it into the config's ``policy.threshold``.

Targets: the least dear share reaching ``min_accuracy``; or the best accuracy within ``max_cost`` per request or
within ``max_dear_share``. The threshold is read off the routing frontier of the cheap backend's nested
out-of-fold estimates (see ``evaluate``), so the expected figures are ones the probe earned on unseen questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probes.metrics import Frontier


@dataclass(frozen=True)
class Choice:
    threshold: float
    accuracy: float
    cost: float
    dear_share: float
    met: bool  # False: no operating point meets the target; the closest one was chosen

    def as_dict(self) -> dict[str, float | bool]:
        return {"threshold": self.threshold, "expected_accuracy": self.accuracy,
                "expected_cost_per_request": self.cost, "expected_dear_share": self.dear_share, "target_met": self.met}


def _at(f: Frontier, i: int, met: bool) -> Choice:
    t = float(np.clip(f.thresholds[i], 0.0, 1.0))
    return Choice(t, float(f.accuracy[i]), float(f.cost[i]), float(f.dear_share[i]), met)


def choose_threshold(
    f: Frontier, *, min_accuracy: float | None = None, max_cost: float | None = None,
    max_dear_share: float | None = None,
) -> Choice:
    """The operating point meeting exactly one target (see the module's docstring)."""
    if sum(v is not None for v in (min_accuracy, max_cost, max_dear_share)) != 1:
        raise ValueError("give exactly one of min_accuracy, max_cost, max_dear_share")
    eps = 1e-12
    if min_accuracy is not None:
        ok = np.flatnonzero(f.accuracy >= min_accuracy - eps)
        if ok.size:
            best = ok[np.lexsort((f.dear_share[ok], f.cost[ok]))[0]]  # the cheapest, then the fewest dear calls
            return _at(f, int(best), True)
        return _at(f, int(np.argmax(f.accuracy)), False)
    limit, values = (max_cost, f.cost) if max_cost is not None else (max_dear_share, f.dear_share)
    ok = np.flatnonzero(values <= limit + eps)
    if ok.size:
        best = ok[np.lexsort((f.cost[ok], -f.accuracy[ok]))[0]]  # the most accurate, then the cheapest
        return _at(f, int(best), True)
    return _at(f, int(np.argmin(values)), False)


_THRESHOLD_LINE = re.compile(r"^(?P<head>[ \t]+threshold:[ \t]*)(?P<value>[^\s#]+)(?P<gap>[ \t]*)(?P<rest>#.*)?$",
                             re.MULTILINE)

_ENV_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-[^}]*\}")


def _format(threshold: float) -> str:
    return f"{threshold:.4f}".rstrip("0").rstrip(".") if 0.0 < threshold < 1.0 else f"{threshold:.1f}"


def set_threshold(text: str, threshold: float) -> str:
    """The YAML ``text`` with ``policy.threshold`` set, comments and layout kept (a targeted line edit)."""
    value = _format(threshold)
    policy = re.search(r"^policy:[ \t]*(#.*)?$", text, re.MULTILINE)
    if policy is None:
        return text.rstrip("\n") + f"\n\npolicy:\n  threshold: {value}\n"
    end = re.search(r"^\S", text[policy.end():], re.MULTILINE)
    block_end = policy.end() + (end.start() if end else len(text) - policy.end())
    block = text[policy.end():block_end]
    m = _THRESHOLD_LINE.search(block)
    if m is None:
        indent = re.search(r"^([ \t]+)\S", block, re.MULTILINE)
        return text[:policy.end()] + f"\n{indent.group(1) if indent else '  '}threshold: {value}" + text[policy.end():]
    if ref := _ENV_DEFAULT.fullmatch(m.group("value")):  # ${VAR:-0.8}: the environment still wins; set the default
        value = f"${{{ref.group(1)}:-{value}}}"
    gap = m.group("gap")
    if m.group("rest"):  # keep the comment in its column where there is room
        gap = " " * max(1, len(gap) + len(m.group("value")) - len(value))
    line = f"{m.group('head')}{value}{gap}{m.group('rest') or ''}"
    block = block[:m.start()] + line + block[m.end():]
    return text[:policy.end()] + block + text[block_end:]


def write_threshold(path: Path, threshold: float) -> None:
    text = path.read_text()
    updated = set_threshold(text, threshold)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(updated)
    tmp.replace(path)
