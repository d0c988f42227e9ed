"""Test support: the pytest plugin (a local control plane per session, S3, Kueue, MLflow), the GitOps harness."""
