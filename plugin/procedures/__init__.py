"""Training procedures, one per file: ways of training an adapter that still save a plain adapter file
relative to the original weights (PiSSA's principal start lives with the backends, `principal_start`)."""

from .mpc import CONSTRAINTS, check_constrainable, mpc_penalty
from .relora import check_restartable, restart, restart_warmup
from .state import restore_training_state, training_state

__all__ = [
    "CONSTRAINTS",
    "check_constrainable",
    "check_restartable",
    "mpc_penalty",
    "restart",
    "restart_warmup",
    "restore_training_state",
    "training_state",
]
