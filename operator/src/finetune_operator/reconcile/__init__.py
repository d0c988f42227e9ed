"""The pure reconcile core: spec + observed children -> desired children, status and actions.

Nothing here performs I/O or reads the clock; the kopf handlers do that and call in.
"""

from finetune_operator.reconcile.children import Settings, desired_children
from finetune_operator.reconcile.health import invalid_spec
from finetune_operator.reconcile.status import Decision, KueueWorkload, Observed, ObservedJob, ObservedPod
from finetune_operator.reconcile.steer import decide

__all__ = [
    "Decision",
    "KueueWorkload",
    "Observed",
    "ObservedJob",
    "ObservedPod",
    "Settings",
    "decide",
    "desired_children",
    "invalid_spec",
]
