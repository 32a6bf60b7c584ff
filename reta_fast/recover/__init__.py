"""The recover step (docs/method.md §2): :class:`RETALoss` (CE + BN-statistic matching + PTA on a frozen
teacher, :mod:`.loss`) and the multi-resolution loop with residual injections (:mod:`.loop`)."""
from .loop import RecoverConfig, augment, recover
from .loss import RETALoss

__all__ = ["RETALoss", "RecoverConfig", "augment", "recover"]
