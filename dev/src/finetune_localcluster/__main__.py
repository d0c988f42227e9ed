"""``python -m finetune_localcluster`` runs the CLI."""

from .cli import main

main()
