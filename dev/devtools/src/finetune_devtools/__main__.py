"""``python -m finetune_devtools`` runs the CLI."""

from finetune_devtools.cli import main

main()
