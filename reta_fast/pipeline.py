"""Deprecated: the pipeline's stages now live in :mod:`reta_fast.stages` (one module per stage). This
alias keeps ``reta_fast.pipeline.distill`` and its neighbours working, including their old ``log=``
keyword (a callable that received each progress line; the stages now use :mod:`logging`, and the
callable is fed the ``reta_fast`` logger's INFO records for the duration of the call). It will be
removed."""
import functools
import logging
import warnings

from . import stages as _stages
from .stages import (METHODS, DistillConfig, EvalConfig, RunMismatch, Stage, item_path, load_distilled,  # noqa: F401
                     write_stage_record)

warnings.warn("reta_fast.pipeline is deprecated: import from reta_fast.stages", DeprecationWarning, stacklevel=2)


class _ToCallable(logging.Handler):
    def __init__(self, fn):
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record):
        self.fn(record.getMessage())


def _accepts_log(fn):
    @functools.wraps(fn)
    def call(*args, log=None, **kwargs):
        if log is None:
            return fn(*args, **kwargs)
        if not callable(log):
            raise TypeError(f"{fn.__name__}: log must be a callable taking one string, got {type(log).__name__}")
        warnings.warn(f"{fn.__name__}(log=...) is deprecated: the stages log through the 'reta_fast' logger",
                      DeprecationWarning, stacklevel=2)
        logger = logging.getLogger("reta_fast")
        handler, level = _ToCallable(log), logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            return fn(*args, **kwargs)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return call


build_pool = _accepts_log(_stages.build_pool)
distill = _accepts_log(_stages.distill)
evaluate = _accepts_log(_stages.evaluate)
relabel_stage = _accepts_log(_stages.relabel_stage)
