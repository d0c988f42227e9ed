"""A real local Kubernetes control plane for tests and for running without a cluster.

Public surface: :class:`Cluster` (start/stop/status), :func:`default_state_dir`,
:func:`ensure_binaries`, and the pytest fixture in :mod:`finetune_testsupport.pytest_plugin`.
"""

from finetune_localcluster.build import Binaries
from finetune_localcluster.build import ensure as ensure_binaries
from finetune_localcluster.cluster import (
    AlreadyRunningError,
    Cluster,
    ClusterError,
    ComponentFailedError,
    default_state_dir,
)

__all__ = [
    "AlreadyRunningError",
    "Binaries",
    "Cluster",
    "ClusterError",
    "ComponentFailedError",
    "default_state_dir",
    "ensure_binaries",
]
