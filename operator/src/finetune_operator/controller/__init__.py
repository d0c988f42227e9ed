"""The controller process: kopf handlers over one reconciler shell, Kubernetes clients, metrics."""
