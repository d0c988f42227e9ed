"""Dev tools on the local cluster, and the command line behind make.

`python -m finetune_devtools` (console script `finetune-dev`): the cluster, the operator and trainer images,
helm, Kueue, the S3 server (SeaweedFS), the MLflow server, KServe's CRDs.
"""
