"""``kubectl finetune``: a kubectl plugin for FineTuneJobs (finetune.dev/v1alpha1).

Layers: ``render`` and ``plot`` are pure (a FineTuneJob in, text or a figure out);
``kube`` does the Kubernetes I/O; ``main`` wires them into commands.
"""
