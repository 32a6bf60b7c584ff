"""Deprecated: the pipeline's stages now live in :mod:`reta_fast.stages` (one module per stage). This
alias keeps ``reta_fast.pipeline.distill`` and its neighbours working; it will be removed."""
import warnings

from .stages import (METHODS, DistillConfig, EvalConfig, RunMismatch, Stage, build_pool, distill, evaluate,  # noqa: F401
                     item_path, load_distilled, relabel_stage, write_stage_record)

warnings.warn("reta_fast.pipeline is deprecated: import from reta_fast.stages", DeprecationWarning, stacklevel=2)
