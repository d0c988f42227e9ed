"""The pure reconcile core: spec + observed children -> desired children, status and actions.

Nothing here performs I/O or reads the clock; the kopf handlers do that and call in.
"""

from finetune_operator.reconcile.children import Settings, desired_children
from finetune_operator.reconcile.health import decide, invalid_spec
from finetune_operator.reconcile.status import Decision, Observed, ObservedJob, ObservedPod

__all__ = [
    "Decision",
    "Observed",
    "ObservedJob",
    "ObservedPod",
    "Settings",
    "decide",
    "desired_children",
    "invalid_spec",
]
