"""The pipeline's stages (docs/method.md §1 and §6), one module each: :mod:`.squeeze`, :mod:`.distill`,
:mod:`.relabel`, :mod:`.evaluate`, :mod:`.report`, :mod:`.plan`; with their settings (:mod:`.config`), the
output folder (:mod:`.output`), stage records (:mod:`.records`) and the sharding of items (:mod:`.shards`)."""
from .config import METHODS, DistillConfig, EvalConfig
from .distill import build_pool, distill
from .evaluate import evaluate
from .output import RunMismatch, item_path, load_distilled
from .records import Stage, write_stage_record
from .relabel import relabel_stage

__all__ = ["METHODS", "DistillConfig", "EvalConfig", "RunMismatch", "Stage", "build_pool", "distill", "evaluate",
           "item_path", "load_distilled", "relabel_stage", "write_stage_record"]
