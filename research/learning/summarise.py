"""Tables of the replay reports for research/learning/README.md: ``python -m research.learning.summarise DIR...``.

Prints, per report: the totals of each arm, the stream after the learner's first N ratings (ECE and AUROC per
backend beside the noise floor), the held-out comparison with probes trained offline on the same ratings, the
target's windows, and the per-window series. Every figure printed is read from the report.json it names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def summarise(path: Path) -> str:
    r = json.loads((path / "report.json").read_text())
    arms = [a for a in ("static", "learning", "fixed") if a in r]
    names = list(r["static"]["total"]["auroc"])
    lines = [f"### {path.name}", "", f"`{r['command']}`", "",
             f"{r['questions']} questions ({', '.join(r['parts'])}), feedback rate {r['feedback_rate']}, explore "
             f"{r['explore']}, target {r['target']}, refit every {r['refit_every']} ratings of a backend; always "
             + ", ".join(f"{n} {v:.3f}" for n, v in r["always"].items()), ""]
    head = "| arm | accuracy | cost / 1k req. (USD) | dear share | explored | explore extra cost / 1k | " + " | ".join(
        f"AUROC {n} | ECE {n}" for n in names) + " |"
    lines += [head, "|" + "---|" * (6 + 2 * len(names))]
    for a in arms:
        t = r[a]["total"]
        lines.append(f"| {a} | {_fmt(t['accuracy'])} | {_fmt(t['cost_per_1k'])} | {_fmt(t['dear_share'])} | "
                     f"{_fmt(t['explored_share'])} | {_fmt(t['explore_extra_cost_per_1k'])} | "
                     + " | ".join(f"{_fmt(t['auroc'][n])} | {_fmt(t['ece'][n])}" for n in names) + " |")
    if "after_ratings" in r:
        ar = r["after_ratings"]
        lines += ["", f"After the learner's first {ar['ratings']} ratings (questions {ar['from_question']} to the end, "
                  f"{ar['learning']['n']} questions):", "",
                  "| backend | ECE static | ECE learning | ECE floor | AUROC static | AUROC learning |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            lines.append(f"| {n} | {_fmt(ar['static']['ece'][n])} | {_fmt(ar['learning']['ece'][n])} | "
                         f"{_fmt(ar['ece_floor'][n])} | {_fmt(ar['static']['auroc'][n])} | "
                         f"{_fmt(ar['learning']['auroc'][n])} |")
    off = r.get("offline_reference", {})
    if off.get("backends"):
        lines += ["", f"Held out ({off['heldout_questions']} questions never streamed), every backend's own labels:",
                  "",
                  "| backend | ratings | AUROC static | AUROC learner (final) | AUROC offline on the same ratings | "
                  "offline's CV AUROC on them | ECE static | ECE learner | ECE offline |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, e in off["backends"].items():
            o = e.get("offline", {})
            lines.append(f"| {n} | {e['ratings']} | {_fmt(e['static']['auroc'])} | {_fmt(e['learner']['auroc'])} | "
                         f"{_fmt(o.get('auroc'))} | {_fmt(o.get('cv_auroc_on_ratings'))} | "
                         f"{_fmt(e['static']['ece'])} | {_fmt(e['learner']['ece'])} | {_fmt(o.get('ece'))} |")
    if r.get("target_check"):
        lines += ["", f"Target {r['target']['kind']} = {r['target']['value']}, full windows of {r['window']}:", "",
                  "| arm | min | max | largest miss |", "|---|---|---|---|"]
        for a, c in r["target_check"].items():
            lines.append(f"| {a} | {_fmt(c['min'])} | {_fmt(c['max'])} | {_fmt(c['largest_miss'])} |")
    key = "dear_share"
    lines += ["", f"Per window of {r['window']} (accuracy / {key} / ECE per backend):", "",
              "| window | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for k, w0 in enumerate(r["static"]["windows"]):
        cells = []
        for a in arms:
            w = r[a]["windows"][k]
            cells.append(f"{_fmt(w['accuracy'])} / {_fmt(w[key])} / "
                         + ", ".join(_fmt(w["ece"][n]) for n in names))
        lines.append(f"| {w0['start']}–{w0['start'] + w0['n']} | " + " | ".join(cells) + " |")
    promotions = r.get("learning", {}).get("promotions", [])
    if promotions:
        lines += ["", "Promotions (question: backend version kind): " + "; ".join(
            f"{p['question']}: {p['backend']} {p['version']} {p['kind']}" for p in promotions)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    for folder in argv if argv is not None else sys.argv[1:]:
        print(summarise(Path(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
