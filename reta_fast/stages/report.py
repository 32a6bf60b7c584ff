"""Run reports: ``report.md`` + ``report.json`` with the accuracy table, wall time and peak memory per
stage, a grid of distilled images per class, and the Betti-0 / Betti-1 curves of real vs synthetic
teacher features (the pull-to-anchor diagnostic of docs/method.md §4: a synthetic Betti-0 curve
shifted left means premature merging, a suppressed Betti-1 curve means lost loops)."""
from __future__ import annotations

import logging
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.sets import random_real_images
from ..data.tensors import denormalise, normalise_pixels
from ..fileio import atomic_write, read_json, write_json
from ..models.features import teacher_features
from ..topology.betti import betti_curves
from .output import load_distilled

__all__ = ["write_report", "image_grid"]

logger = logging.getLogger(__name__)

def image_grid(images_u8: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """``[rows * cols, 3, H, W]`` uint8 (row-major, missing cells black) -> ``[rows*(H+2), cols*(W+2), 3]``."""
    n, _, H, W = images_u8.shape
    canvas = np.full((rows * (H + 2), cols * (W + 2), 3), 255, dtype=np.uint8)
    for idx in range(min(n, rows * cols)):
        r, c = divmod(idx, cols)
        canvas[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = \
            images_u8[idx].permute(1, 2, 0).numpy()
    return canvas


def _png(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    atomic_write(path, lambda fh: fh.write(data))


def _fmt_bytes(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def write_report(out, data, teacher, k: int = 10, max_classes: int = 10, max_ipc: int = 10, seed: int = 0,
                 device="cpu") -> dict:
    """Assemble ``out/report.md`` and ``out/report.json`` from what the stages left in ``out``
    (``run.json``, ``stages/*.json``, ``eval.json``) and draw ``report/grid.png`` and
    ``report/betti.png`` (teacher features of the distilled images vs as many random real images
    per class)."""
    out = Path(out)
    run = read_json(out / "run.json", "run manifest") if (out / "run.json").is_file() else {}
    ev = read_json(out / "eval.json", "evaluation") if (out / "eval.json").is_file() else None
    stages = [read_json(p, "stage record") for p in sorted((out / "stages").glob("*.json"))] \
        if (out / "stages").is_dir() else []
    order = {"squeeze": 0, "distill": 1, "relabel": 2, "evaluate": 3}
    stages.sort(key=lambda s: order.get(s.get("stage"), 9))
    x, y, _ = load_distilled(out, data.classes, data.mean, data.std, data.size)
    C = len(data.classes)
    ipc = int(torch.bincount(y, minlength=C).min())
    if ipc == 0:
        empty = [data.classes[c] for c in range(C) if not (y == c).any()][:5]
        raise ValueError(f"the distilled set in {str(out)!r} is incomplete (no image for classes {empty}): finish "
                         f"`reta distill` first")
    rep = dict(data=data.name, classes=C, size=data.size, method=run.get("method"), ipc=ipc,
               config=run.get("config"), teacher=dict(name=teacher.name, top1=teacher.accuracy),
               evaluation=ev, stages=stages, versions=run.get("versions"))
    (out / "report").mkdir(exist_ok=True)
    u8 = (denormalise(x, data.mean, data.std).clamp(0, 1) * 255).round().to(torch.uint8)
    shown_c, shown_i = list(range(min(C, max_classes))), min(ipc, max_ipc)
    cells = []
    for c in shown_c:
        rows = (y == c).nonzero().flatten()[:shown_i]
        cells += [u8[r] for r in rows] + [torch.zeros_like(u8[0])] * (shown_i - rows.numel())
    grid = image_grid(torch.stack(cells), len(shown_c), shown_i)
    pictures = {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(3, shown_i * 0.6), max(3, len(shown_c) * 0.6)))
        ax.imshow(grid, interpolation="nearest")
        ax.set_yticks([(data.size + 2) * (r + 0.5) for r in range(len(shown_c))])
        ax.set_yticklabels([data.classes[c][:14] for c in shown_c], fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"{run.get('method', '')} distilled images (IPC {ipc})", fontsize=9)
        _png(out / "report" / "grid.png", fig)
        plt.close(fig)
        pictures["grid"] = "report/grid.png"

    # Betti curves: the synthetic set vs as many random real images per class
    kk = min(k, ipc - 1)
    if kk >= 1 and ipc >= 3:
        rr = random_real_images(data, ipc, seed + 1)
        xr = normalise_pixels(torch.stack([rr[(c, i)] for c in range(C) for i in range(ipc)]), data.mean, data.std)
        xs = torch.cat([x[y == c][:ipc] for c in range(C)])
        model = teacher.model.to(device).eval()
        with torch.no_grad():
            feats = [torch.cat([teacher_features(model, z[a:a + 256].to(device))[1].float().cpu()
                                for a in range(0, len(z), 256)]).view(C, ipc, -1) for z in (xr, xs)]
        grid_t = torch.linspace(0, 2.0, 201)
        real_c, syn_c = (betti_curves(f, kk, grid_t) for f in feats)
        rep["betti"] = dict(k=kk, points_per_class=ipc, t=grid_t.tolist(),
                            real=dict(b0=real_c["b0"].tolist(), b1=real_c["b1"].tolist()),
                            synthetic=dict(b0=syn_c["b0"].tolist(), b1=syn_c["b1"].tolist()))
        if plt is not None:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
            for ax, key, title in ((axes[0], "b0", "Betti-0 (components)"), (axes[1], "b1", "Betti-1 (loops)")):
                ax.plot(grid_t, real_c[key], label="real", color="#1f77b4")
                ax.plot(grid_t, syn_c[key], label="synthetic", color="#d62728")
                ax.set_xlabel("edge length (L2-normalised teacher features)")
                ax.set_title(title, fontsize=9)
                ax.grid(alpha=0.3)
            axes[0].legend()
            fig.suptitle(f"mutual {kk}-NN flag complex, {ipc} points per class, mean over {C} classes", fontsize=9)
            _png(out / "report" / "betti.png", fig)
            plt.close(fig)
            pictures["betti"] = "report/betti.png"
    else:
        rep["betti"] = None
    rep["pictures"] = pictures
    write_json(out / "report.json", rep)
    atomic_write(out / "report.md", lambda fh: fh.write(_markdown(rep).encode()))
    logger.info(f"[report] {out / 'report.md'}")
    return rep


def _markdown(rep: dict) -> str:
    L = [f"# reta_fast run: {rep['method']} on {rep['data']}", "",
         f"{rep['classes']} classes at {rep['size']} px, IPC {rep['ipc']}; teacher {rep['teacher']['name']}"
         + (f" (top-1 {rep['teacher']['top1']:.2f}%)" if rep['teacher']['top1'] is not None else "") + ".", ""]
    ev = rep.get("evaluation")
    L += ["## Accuracy (student top-1 on the validation split)", ""]
    if ev:
        def ms(s):
            return "-" if not s else f"{s['mean']:.2f} ± {s['std']:.2f} (n={len(s['runs'])})"
        L += ["| method | IPC | student | top-1 % | teacher % | random real % (same IPC) |", "|---|---|---|---|---|---|",
              f"| {ev['method']} | {ev['ipc']} | {ev['student']} | {ms(ev['distilled'])} | {ev['teacher_top1']:.2f} | "
              f"{ms(ev.get('random_real'))} |", ""]
        p = ev["protocol"]
        L += [f"Protocol: {p['epochs']} epochs, batch {p['batch_size']}, AdamW lr {p['lr']} wd {p['weight_decay']}, "
              f"KL at T={p['temperature']}, RandomResizedCrop {tuple(p['crop_scale'])}{' + flip' if p.get('flip', True) else ''}"
              f"{' + CutMix' if p['cutmix'] else ''}, {p['labels']} soft labels, seeds {p['seeds']}.", ""]
    else:
        L += ["Not evaluated yet (`reta evaluate`).", ""]
    L += ["## Stages", "", "| stage | wall time | peak memory | notes |", "|---|---|---|---|"]
    for s in rep["stages"]:
        notes = []
        if s.get("loss_parts"):
            lp = s["loss_parts"]
            notes.append(f"final loss parts ce {lp['ce']:.3f}, bn {lp['bn']:.3f}, topo {lp['topo']:.4f}")
        if "written" in s:
            notes.append(f"{s['written']} images written, {s.get('skipped', 0)} already there")
        calls = s.get("calls") or []
        if len(calls) > 1:
            notes.append(f"{len(calls)} calls (resumes, slices or ranks), {s.get('seconds_total', 0):.1f} s in all"
                         + (f", {s['written_total']} images written in all" if "written_total" in s else ""))
        L.append(f"| {s['stage']} | {s['seconds']:.1f} s | {_fmt_bytes(s.get('peak_bytes'))} ({s.get('peak_kind', '')}) | "
                 f"{'; '.join(notes)} |")
    L.append("")
    pics = rep.get("pictures", {})
    if "grid" in pics:
        L += ["## Distilled images", "", f"![distilled images]({pics['grid']})", ""]
    L += ["## Topology: Betti curves, real vs synthetic", ""]
    if rep.get("betti"):
        b = rep["betti"]
        if "betti" in pics:
            L += [f"![Betti curves]({pics['betti']})", ""]
        t = np.asarray(b["t"])

        def area(v):
            return float(np.trapezoid(np.asarray(v), t)) if hasattr(np, "trapezoid") else float(np.trapz(v, t))
        L += [f"Mutual {b['k']}-NN flag complex of L2-normalised teacher features, {b['points_per_class']} points per "
              f"class. Area under the curves (real / synthetic): Betti-0 {area(b['real']['b0']):.3f} / "
              f"{area(b['synthetic']['b0']):.3f}, Betti-1 {area(b['real']['b1']):.4f} / {area(b['synthetic']['b1']):.4f}. "
              f"A smaller synthetic Betti-0 area means components merge earlier (pull-to-anchor); a smaller "
              f"Betti-1 area means suppressed loops.", ""]
    else:
        L += ["Needs at least 3 images per class.", ""]
    L += _diagnostics_markdown(next((s.get("diagnostics") for s in rep["stages"] if s.get("stage") == "distill"), None))
    if rep.get("versions"):
        L += ["Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), ""]
    return "\n".join(L)


def _diagnostics_markdown(d: Optional[dict]) -> list:
    """What DRC and PTA did during recovery (the distill stage's record)."""
    if not d:
        return []
    L = ["## What DRC and PTA did", ""]
    if d.get("drc"):
        L += ["DRC at each residual injection, against re-injecting the image's own initial patch (the static "
              "anchor): share of images whose retrieved patch *is* their anchor; fit `|q - z|^2` of the teacher "
              "features and per-class scaled complexity of the retrieved vs the anchor patches; distinct retrieved "
              "patches per class over its images; the retrieved patch's mean place in the image's share of the "
              "pool (its RDED rank // IPC: 0 is the anchor's place, the best-ranked; a connection without a row "
              "re-injected the static anchor: --drc-connections).", "",
              "| after block | own anchor | fit retrieved / anchor | complexity retrieved / anchor | distinct per class "
              "| place in share |",
              "|---|---|---|---|---|---|"]
        L += [f"| {r['block']} | {100 * r['own_anchor']:.0f}% | {r['fit_retrieved']:.4f} / {r['fit_anchor']:.4f} | "
              f"{r['complexity_retrieved']:.3f} / {r['complexity_anchor']:.3f} | {r['distinct_per_class']:.2f} | "
              + (f"{r['share_place']:.1f} |" if "share_place" in r else "– |") for r in d["drc"]]
        L.append("")
    if d.get("grads"):
        weighed = all("topo_weight" in r for r in d["grads"])  # --pta-balance: PTA's weight set each step
        L += ["Gradient norm of each weighted loss term on the pixels, at the last step of each block"
              + (" (PTA weight: the one --pta-balance set at that step):" if weighed else ":"), "",
              "| block | CE | BN | PTA | PTA / CE | PTA / BN |" + (" PTA weight |" if weighed else ""),
              "|---|---|---|---|---|---|" + ("---|" if weighed else "")]
        L += [f"| {r['block']} | {r['ce']:.3g} | {r['bn']:.3g} | {r['topo']:.3g} | {r['topo_over_ce']:.3f} | "
              f"{r['topo_over_bn']:.3f} |" + (f" {r['topo_weight']:.3g} |" if weighed else "") for r in d["grads"]]
        L.append("")
    b = d.get("betti")
    if b:
        L += [f"Betti-curve distance of each class's synthetic set to real features (mean over {b['classes']} classes, "
              f"mutual {b['k']}-NN, {b['points']} points per class; 0 = the same curves): before recovery Betti-0 "
              f"{b['before']['b0']:.4f}, Betti-1 {b['before']['b1']:.4f}; after recovery Betti-0 "
              f"{b['after']['b0']:.4f}, Betti-1 {b['after']['b1']:.4f}." + (
                  f" PTA's loss on the images as they are (the view a student trains on): {b['before']['pta']:.4f} "
                  f"before, {b['after']['pta']:.4f} after." if "pta" in b["after"] else ""), ""]
    return L
