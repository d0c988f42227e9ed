"""finetune_operator: the Kubernetes controller for FineTuneJob resources."""

__version__ = "0.1.0"
