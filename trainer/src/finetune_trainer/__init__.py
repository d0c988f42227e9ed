"""finetune_trainer: the training runtime of finetune-operator.

Importing this package (and ``spec`` / ``early_stopping``) never imports torch.
"""

__version__ = "0.1.0"
