"""Build-time generators: the CRDs, admission policies, roles and chart files.

`python -m finetune_operator.generators.crd` writes them all (one table of outputs: `generated_files`).
"""
