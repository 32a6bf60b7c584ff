"""What decides one method's lead over another, seed by seed: a study of bench/quality.py's results.

    python bench/paired_study.py --results bench/results/quality-cpu-cifar10-intel-xeon --a reta --b fadrm

Reads ``validation.json`` and ``results.json`` (the test split) in ``--results``, pairs the two methods by
distillation seed (the same pool, initial patches and augmentation streams) and prints, per IPC, each seed's
difference on both splits beside method A's recorded diagnostics (DRC: the share of injections that re-inject
the image's own anchor, the retrieved patch's fit term and complexity against the anchor's, means over the
connections; PTA: its loss on the images as they are after recovery, A's and B's), then the
Pearson correlation of the validation difference with each column and with the test difference. A test
difference that follows the validation one says the per-seed lead belongs to the set, not to the students
that score it; a diagnostic that follows it would say what makes a good seed. Nothing is chosen from this: it
reads scores already made.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SPLITS = (("val", "validation.json"), ("test", "results.json"))
# (column, how it is read from one seed's diagnostics of the row)
COLUMNS = (
    ("DRC own anchor", lambda d: _mean(b["own_anchor"] for b in d.get("drc", []))),
    ("fit retrieved / anchor", lambda d: _mean(b["fit_retrieved"] / b["fit_anchor"] for b in d.get("drc", [])
                                                if b["fit_anchor"])),
    ("complexity retrieved / anchor", lambda d: _mean(b["complexity_retrieved"] / b["complexity_anchor"]
                                                       for b in d.get("drc", []) if b["complexity_anchor"])),
    ("PTA loss after", lambda d: d.get("betti", {}).get("after", {}).get("pta")),
)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def pearson(x, y):
    """Pearson's r over the pairs where both are numbers; None for fewer than three or a constant side."""
    pts = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pts) < 3:
        return None
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    sx, sy = (math.sqrt(sum((p[i] - m) ** 2 for p in pts)) for i, m in ((0, mx), (1, my)))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def load(results: Path) -> dict:
    """{split: {(name, ipc): row}} for the splits whose file exists; refuses a folder holding neither."""
    if not results.is_dir():
        raise SystemExit(f"--results {str(results)!r} is not a folder")
    out = {}
    for split, fname in SPLITS:
        p = results / fname
        if p.exists():
            try:
                rows = json.loads(p.read_text())["rows"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{p}: not a bench/quality.py results file ({exc})") from None
            out[split] = {(r["name"], r["ipc"]): r for r in rows}
    if not out:
        raise SystemExit(f"--results {str(results)!r} holds neither validation.json nor results.json")
    return out


def _top1(row, seed):
    s = row["seeds"].get(seed) if row else None
    return None if s is None else s["top1"]["mean"]


def study(data: dict, a: str, b: str) -> str:
    names = {n for rows in data.values() for n, _ in rows}
    for m in (a, b):
        if m not in names:
            raise SystemExit(f"no row {m!r} in these results (rows: {', '.join(sorted(names))})")
    ipcs = sorted({i for rows in data.values() for n, i in rows if n in (a, b)})
    L = [f"# {a} − {b}, paired by distillation seed", ""]
    for ipc in ipcs:
        rows = {s: (data.get(s, {}).get((a, ipc)), data.get(s, {}).get((b, ipc))) for s, _ in SPLITS}
        seeds = sorted({k for ra, rb in rows.values() if ra and rb for k in ra["seeds"] if k in rb["seeds"]}, key=int)
        if len(seeds) < 2:
            continue
        diff = {s: [None if _top1(ra, k) is None or _top1(rb, k) is None else _top1(ra, k) - _top1(rb, k)
                    for k in seeds] for s, (ra, rb) in rows.items()}
        diag_a = (rows["val"][0] or rows["test"][0] or {}).get("diagnostics", {})
        diag_b = (rows["val"][1] or rows["test"][1] or {}).get("diagnostics", {})
        cols = [(name, [get(diag_a[k]) if k in diag_a else None for k in seeds]) for name, get in COLUMNS]
        cols.append((f"{b}: PTA loss after", [COLUMNS[-1][1](diag_b[k]) if k in diag_b else None for k in seeds]))
        cols.append((f"{b}: its validation score", [_top1(rows["val"][1], k) for k in seeds]))
        L += [f"## IPC {ipc}", "",
              "| seed | validation difference | test difference | " + " | ".join(c for c, _ in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
        fmt = (lambda v, f: "–" if v is None else format(v, f))
        for j, k in enumerate(seeds):
            L.append(f"| {k} | {fmt(diff['val'][j], '+.2f')} | {fmt(diff['test'][j], '+.2f')} | "
                     + " | ".join(fmt(v[j], ".4g") for _, v in cols) + " |")
        L += ["", "Pearson r with the validation difference (seeds where both are known):"]
        r = pearson(diff["val"], diff["test"])
        L.append(f"- test difference: {fmt(r, '+.2f')} "
                 f"({sum(x is not None and y is not None for x, y in zip(diff['val'], diff['test']))} seeds)")
        L += [f"- {c}: {fmt(pearson(diff['val'], v), '+.2f')}" for c, v in cols]
        L.append("")
    if len(L) == 2:
        raise SystemExit(f"{a} and {b} share fewer than two distillation seeds at every IPC: nothing to pair")
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", required=True, type=Path, help="a bench/quality.py results folder")
    ap.add_argument("--a", default="reta", help="the method whose lead is studied (default reta)")
    ap.add_argument("--b", default="fadrm", help="the method it is paired with (default fadrm)")
    args = ap.parse_args(argv)
    print(study(load(args.results), args.a, args.b))


if __name__ == "__main__":
    main(sys.argv[1:])
