"""Command line entry point ``reta``: the distillation pipeline, stage by stage or all at once.

    reta squeeze   train a BN teacher on a data set (prints its top-1)
    reta distill   build/load the patch pool and write the distilled set (--method reta | baselines)
    reta relabel   stored soft labels for the student protocol + a tensor export
    reta evaluate  train students on the distilled set; top-1 vs the teacher and random real images
    reta report    report.md / report.json with pictures
    reta plan      expected wall time and peak memory of a distill job, from a short calibration
    reta run       all of the above
    reta demo      all of the above on the embedded digits data set (no download, minutes on a CPU)
    reta topo-demo the PTA loss alone on synthetic point clouds

Under ``torchrun`` the distill stage shards its batches over the ranks (``RANK``/``WORLD_SIZE``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from ..stages.config import DistillConfig, EvalConfig
from .commands import (_device, check_settings, cmd_distill, cmd_evaluate, cmd_plan, cmd_relabel, cmd_report,
                       cmd_run, cmd_squeeze)
from .flags import add_config_flags
from .topo_demo import topo_demo

__all__ = ["main", "build_parser"]


# `reta demo`: the embedded digits, small enough for a CPU in well under a minute
DEMO = dict(data="digits", out="reta-demo")
DEMO_DISTILL = dict(method="reta", ipc=10, iterations=200, blocks=4, batch_classes=10, topo_k=4)
DEMO_EVAL = dict(epochs=150, batch_size=50, lr=1e-2, seeds=(0, 1, 2))


def _common(p, demo=False, squeeze=False):
    g = p.add_argument_group("common")
    g.add_argument("--data", default="digits" if demo else None, required=not demo,
                   help="ImageFolder path (ROOT/<class>/ or ROOT/train + ROOT/val), digits, or a torchvision name")
    g.add_argument("--val", help="validation ImageFolder (default: ROOT/val|test, else a 10%% holdout)")
    g.add_argument("--data-root", help="download folder for torchvision data sets")
    g.add_argument("--size", type=int, help="working image size (default: 16 for digits, 32 for CIFAR, probed "
                                             "for folders, at most 224)")
    if not squeeze:
        g.add_argument("--teacher", help="teacher checkpoint, torchvision:<name> or timm:<name>; a comma-separated "
                                          "list takes turns (FADRM+). Default: for distill/run the data set's "
                                          "default teacher, squeezed once and cached; for relabel/evaluate/report "
                                          "the teacher recorded in OUT/run.json")
        g.add_argument("--teacher-weights", help="state-dict file (or DEFAULT) for torchvision:/timm: teachers")
        g.add_argument("--teacher-head", help="name of the teacher's classifier nn.Linear (its input: the features "
                                               "DRC and PTA read) where it is not the model's last nn.Linear; one "
                                               "name, or a comma-separated list with one per --teacher")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    if not squeeze:
        g.add_argument("--arch", choices=["convnet", "resnet18"],
                       help="architecture of the default teacher when one is squeezed (see reta squeeze)")
        g.add_argument("--squeeze-epochs", type=int, help="epochs of that squeeze")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data loader processes for streamed data sets")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels only (torch.use_deterministic_algorithms; slower)")


def _out(p, demo=False):
    p.add_argument("--out", default=DEMO["out"] if demo else None, required=not demo,
                   help="output folder (resumed if it holds the same run, refused if another)")


def _distill_args(p, demo=False):
    add_config_flags(p, DistillConfig, "distill", overrides=DEMO_DISTILL if demo else None)
    p.add_argument("--pool", help="patch pool folder (default: a cache folder keyed by data, teacher, params)")


def _eval_args(p, demo=False):
    add_config_flags(p, EvalConfig, "evaluate", prefix="eval_", overrides=DEMO_EVAL if demo else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reta", description="RETA dataset distillation (reta_fast)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("squeeze", help="train a BN teacher on a data set")
    _common(s, squeeze=True)
    s.add_argument("--arch", choices=["convnet", "resnet18"], help="default: convnet for digits, else resnet18")
    s.add_argument("--epochs", type=int)
    s.add_argument("--squeeze-lr", type=float)
    s.add_argument("--teacher-out", help="checkpoint path (default: the teacher cache)")
    s.set_defaults(func=cmd_squeeze)

    for name, fn, helptext, parts in (
            ("distill", cmd_distill, "write the distilled set", ("d",)),
            ("relabel", cmd_relabel, "stored soft labels + tensor export", ("e",)),
            ("evaluate", cmd_evaluate, "train students on the distilled set", ("e",)),
            ("report", cmd_report, "write report.md/json with pictures", ("k",)),
            ("run", cmd_run, "all stages", ("d", "e")),
            ("demo", cmd_run, "all stages on the embedded digits data set", ("d", "e"))):
        demo = name == "demo"
        q = sub.add_parser(name, help=helptext)
        _common(q, demo)
        _out(q, demo)
        if "d" in parts:
            _distill_args(q, demo)
        if "e" in parts:
            _eval_args(q, demo)
        if "k" in parts:
            q.add_argument("--topo-k", type=int, default=None)
        if "d" not in parts:
            q.set_defaults(method=None)
        q.set_defaults(func=fn)

    q = sub.add_parser("plan", help="estimate a distill job's wall time and peak memory from a short calibration")
    _common(q)
    _distill_args(q)
    q.add_argument("--gpus", type=int, default=1, help="devices (torchrun ranks) the job will use")
    q.add_argument("--calibration-steps", type=int, default=5)
    q.set_defaults(func=cmd_plan, out=None)

    d = sub.add_parser("topo-demo", help="PTA on synthetic point clouds: align a collapsed set to real loops")
    d.add_argument("--classes", type=int, default=8)
    d.add_argument("--points", type=int, default=64)
    d.add_argument("--dim", type=int, default=32)
    d.add_argument("--k", type=int, default=8)
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=topo_demo)
    return p


_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, FloatingPointError,
                PermissionError)


def _configure_logging(quiet: bool) -> None:
    """What the library says (the ``reta_fast`` loggers) goes to stdout as plain lines; ``--quiet`` (and
    every torchrun rank but 0) keeps only warnings. A library user routes or silences them as usual."""
    log = logging.getLogger("reta_fast")
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
    log.setLevel(logging.WARNING if quiet else logging.INFO)


class _Stdout(logging.Handler):
    """Plain lines on whatever ``sys.stdout`` is when a record is emitted (so a replaced stdout, e.g. a
    test's capture, gets them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(record.getMessage() + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "topo-demo":
        for name in ("classes", "points", "dim", "k", "steps"):
            if getattr(args, name) < 1:
                print(f"reta: --{name} must be >= 1", file=sys.stderr)
                return 2
        return args.func(args)
    _configure_logging(args.quiet or int(os.environ.get("RANK", 0)) != 0)
    if getattr(args, "deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    ok = False
    try:
        args.device = _device(args.device)
        check_settings(args)
        rc = args.func(args)
        ok = rc == 0
        return rc
    except _USER_ERRORS as exc:
        print(f"reta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. disk full: the partial file was already removed
        print(f"reta {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reta {args.command}: interrupted; finished items are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if ok:  # leave together: a rank tearing gloo down while another still uses it aborts (SIGABRT)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
