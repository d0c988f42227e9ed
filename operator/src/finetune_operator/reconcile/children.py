"""Desired children of a FineTuneJob: pure functions from the spec to Kubernetes manifests.

No I/O. Names are deterministic, so creating a child twice is a 409 (which the shell treats
as success), and every child is owned by the FineTuneJob, so deleting it cascades.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from finetune_operator.api.job import (
    API_VERSION,
    CPU_REQUEST_ENV,
    DATASET_HF_TOKEN_ENV,
    DEFAULT_METRICS_PORT,
    DEFAULT_PVC_ROOT,
    DEFAULT_REPORT_INTERVAL_SECONDS,
    DEFAULT_SCRATCH,
    DEFAULT_TRAINER_IMAGE,
    GPU_MEMORY_ENV,
    GROUP,
    HF_TOKEN_ENV,
    JOB_NAME_ENV,
    JOB_NAMESPACE_ENV,
    JOB_UID_ENV,
    KIND,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    MAX_NODES,
    METRICS_ADDRESS_ENV,
    METRICS_PORT_ENV,
    PLURAL,
    PVC_ROOT_ENV,
    REPORT_INTERVAL_ENV,
    TERMINATION_GRACE_ENV,
    TRACKING_SECRET_KEYS,
    FineTuneJob,
)
from finetune_operator.reconcile.kinds import BY_KIND
from finetune_trainer import exitcodes
from finetune_trainer.contract import S3_CREDENTIAL_KEYS, s3_env_prefix
from finetune_trainer.memory_plan import job_gpus
from finetune_trainer.spec import TrainingSpec, quantity_value

Manifest = dict[str, Any]

MANAGED_BY = "finetune-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
JOB_LABEL = "finetune.dev/job"
SPEC_HASH_ANNOTATION = "finetune.dev/spec-hash"
CONFIG_HASH_ANNOTATION = "finetune.dev/config-hash"
"""On the pod template: a config edited while suspended changes the Job's hash, so it is replaced."""
TRAINER_CONTAINER = "trainer"
CONFIG_FILE = "config.yaml"
TERMINATION_GRACE_SECONDS = 120
"""The trainer pod's terminationGracePeriodSeconds: the time it has to save a checkpoint after SIGTERM.
The trainer gets it in ``TERMINATION_GRACE_ENV`` too, so that torchrun waits as long for its workers."""
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's dumper when PyYAML has it: the same YAML, an order of magnitude less CPU per job."""


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape the children (flags of `finetune-operator run`)."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    trainer_metrics_port: int = DEFAULT_METRICS_PORT
    rendezvous_port: int = 29500
    config_dir: str = "/etc/finetune"
    pvc_root: str = DEFAULT_PVC_ROOT
    run_as_user: int = 65532
    report_interval_seconds: int = DEFAULT_REPORT_INTERVAL_SECONDS
    """Each running trainer's progress heartbeat is a status write; evaluations go out at once.
    At 5 s, 500 running jobs kept a 2-core API server saturated (benchmarks/operator_scale.py)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    operator_namespace: str | None = None
    """The operator's own namespace (its ServiceAccount lives there): jobs and sweeps there are refused."""
    ephemeral_storage_request: str = "1Gi"
    """What the scheduler reserves of a node's local disk per trainer pod that sets
    ``spec.resources.ephemeralStorage`` (at most that limit): reserving the whole limit would leave most
    nodes' disks idle."""


@dataclass(frozen=True)
class Names:
    """Deterministic child names; Job names stay within the 63 characters pod labels allow."""

    job: str
    config_map: str
    service_account: str
    role: str
    service: str

    @classmethod
    def of(cls, ftj_name: str, multi_node: bool = False) -> Names:
        """Multi-node children are DNS labels (no dots): the Service's name and the pods' hostnames
        (``<job>-<index>``) must be, for the largest index any node count allows, so no edit of
        ``nodes`` can make a pod uncreatable. Single-node names keep their dots, as they always had."""
        limit = 63 - len("-trainer") - (len(f"-{MAX_NODES - 1}") if multi_node else 0)
        base = bounded_name(ftj_name, limit, dns_label=multi_node)
        return cls(
            job=f"{base}-trainer",
            config_map=f"{base}-config",
            service_account=f"{base}-trainer",
            role=f"{base}-trainer",
            service=f"{base}-workers",
        )

    @classmethod
    def for_job(cls, job: FineTuneJob) -> Names:
        return cls.of(job.metadata.name, multi_node=job.spec.resources.nodes > 1)


def bounded_name(name: str, limit: int, dns_label: bool = False) -> str:
    """``name`` within ``limit`` characters (and without dots for a DNS label). A name that had to
    change gets a hash of the original, so ``a.b`` and ``a-b`` never share children."""
    shaped = name.replace(".", "-") if dns_label else name
    if shaped == name and len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{shaped[: limit - 9].rstrip('-.')}-{digest}"


def job_label_value(ftj_name: str) -> str:
    """The value of ``finetune.dev/job`` on children and pods: the name, hashed beyond the 63
    characters a label value may hold. Child events find their FineTuneJob by owner reference."""
    return ftj_name if len(ftj_name) <= 63 else bounded_name(ftj_name, 63)


def labels(job: FineTuneJob) -> dict[str, str]:
    value = job_label_value(job.metadata.name)
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        MANAGED_BY_LABEL: MANAGED_BY,
        "app.kubernetes.io/instance": value,
        JOB_LABEL: value,
    }


def controller_of(child: Manifest) -> Manifest | None:
    """The controller ownerReference of a stored child, if any."""
    for reference in (child.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("controller"):
            return dict(reference)
    return None


def owned_by(child: Manifest, job: FineTuneJob) -> bool:
    """True when ``child`` is controlled by this very FineTuneJob (same uid, not a namesake)."""
    owner = controller_of(child)
    return owner is not None and owner.get("kind") == KIND and owner.get("uid") == job.metadata.uid


def owner_name(child: Manifest) -> str | None:
    """The name of the FineTuneJob controlling a child: how its events find the job (the label
    value may be a hash)."""
    owner = controller_of(child)
    return str(owner["name"]) if owner is not None and owner.get("kind") == KIND else None


def owner_reference(job: FineTuneJob) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str) -> Manifest:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job),
        "ownerReferences": [owner_reference(job)],
    }


def spec_hash(manifest: Manifest) -> str:
    """Hash of what we generate, stamped on each child so drift (or an upgrade) is detectable."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def content_hash(child: Manifest) -> str | None:
    """Hash of what a child holds (``kinds.ChildKind.content``), the same for the child as rendered and as
    stored: how an edit that keeps the spec-hash annotation is still seen. None for a kind with no content."""
    paths = BY_KIND[child["kind"]].content
    if not paths:
        return None
    held: dict[str, Any] = {}
    for path in paths:
        value: Any = child
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        held[path] = value
    return spec_hash(held)


def _stamped(manifest: Manifest) -> Manifest:
    manifest["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash(manifest)
    return manifest


def training_config(job: FineTuneJob) -> str:
    """The trainer's config file: exactly the training part of the spec, camelCase."""
    training = TrainingSpec.model_validate(job.spec.model_dump(include=set(TrainingSpec.model_fields)))
    return yaml.dump(training.to_wire(), Dumper=_YAML_DUMPER, sort_keys=False)


def config_map(job: FineTuneJob, config: str | None = None) -> Manifest:
    """``config``: ``training_config(job)`` when the caller has it already (it is a third of a job's rendering)."""
    names = Names.for_job(job)
    return _stamped(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(job, names.config_map),
            "data": {CONFIG_FILE: training_config(job) if config is None else config},
        }
    )


def service_account(job: FineTuneJob) -> Manifest:
    names = Names.for_job(job)
    return _stamped({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, names.service_account)})


def role(job: FineTuneJob) -> Manifest:
    """Least privilege for the trainer: read its own FineTuneJob, patch its own status."""
    names = Names.for_job(job)
    own = [job.metadata.name]
    return _stamped(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, names.role),
            "rules": [
                {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": own, "verbs": ["get"]},
                {
                    "apiGroups": [GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": own,
                    "verbs": ["get", "patch"],
                },
            ],
        }
    )


def role_binding(job: FineTuneJob) -> Manifest:
    names = Names.for_job(job)
    account = job.spec.resources.service_account_name or names.service_account
    return _stamped(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, names.role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": job.metadata.namespace}],
        }
    )


def headless_service(job: FineTuneJob, settings: Settings) -> Manifest:
    """Stable DNS names (<job>-<index>.<service>) for the torchrun rendezvous of multi-node jobs."""
    names = Names.for_job(job)
    return _stamped(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(job, names.service),
            "spec": {
                "type": "ClusterIP",  # stated, not defaulted: part of what drift is checked on
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {JOB_LABEL: job_label_value(job.metadata.name)},
                "ports": [
                    {
                        "name": "rendezvous",
                        "protocol": "TCP",
                        "port": settings.rendezvous_port,
                        "targetPort": settings.rendezvous_port,
                    }
                ],
            },
        }
    )


def _claim(uri: str) -> str | None:
    return uri.removeprefix("pvc://").split("/", 1)[0] if uri.startswith("pvc://") else None


def _claims(job: FineTuneJob) -> list[tuple[str, bool]]:
    """PersistentVolumeClaims the spec reads or writes, in a stable order, each with whether it is
    only read (a source and not the output or the download cache: mounted read-only, so the trainer
    cannot alter it)."""
    read = {_claim(job.spec.model.source), _claim(job.spec.dataset.source)}
    cache = job.spec.storage.cache
    written = {_claim(job.spec.output.location), _claim(cache.location) if cache is not None else None}
    claims = (read | written) - {None}
    return sorted((claim, claim not in written) for claim in claims if claim is not None)


def s3_secrets(job: FineTuneJob) -> dict[str, str]:
    """The S3 credentials Secret of each role (model, dataset, output) whose URI is s3://: a source's own
    ``s3`` block, else ``spec.storage.s3``. Roles without a Secret use the pod's identity (IRSA)."""
    spec = job.spec
    found: dict[str, str] = {}
    for role, uri, own in (
        ("model", spec.model.source, spec.model.s3),
        ("dataset", spec.dataset.source, spec.dataset.s3),
        ("output", spec.output.location, spec.output.s3),
    ):
        settings = own or spec.storage.s3
        if uri.startswith("s3://") and settings is not None and settings.credentials_secret_ref is not None:
            found[role] = settings.credentials_secret_ref.name
    return found


def _s3_credentials_env(job: FineTuneJob) -> list[Manifest]:
    """Each role's keys from its Secret, under its own prefix (``finetune_trainer.contract.s3_env_prefix``)."""
    return [
        {
            "name": s3_env_prefix(role) + key,
            "valueFrom": {
                "secretKeyRef": {"name": name, "key": key, **({"optional": True} if key == "AWS_SESSION_TOKEN" else {})}
            },
        }
        for role, name in s3_secrets(job).items()
        for key in S3_CREDENTIAL_KEYS
    ]


def _env(job: FineTuneJob, settings: Settings, names: Names) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": JOB_NAME_ENV, "value": job.metadata.name},
        {"name": JOB_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The trainer resumes only checkpoints of this uid: a re-applied job with the same name starts fresh.
        {"name": JOB_UID_ENV, "value": job.metadata.uid or ""},
        {"name": METRICS_PORT_ENV, "value": str(settings.trainer_metrics_port)},
        # The pod's own IP: where a cluster (or the local node, which gives each pod one) routes the scrape.
        {"name": METRICS_ADDRESS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": REPORT_INTERVAL_ENV, "value": str(settings.report_interval_seconds)},
        {"name": PVC_ROOT_ENV, "value": settings.pvc_root},
        {"name": TERMINATION_GRACE_ENV, "value": str(TERMINATION_GRACE_SECONDS)},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if job.spec.resources.cpu is not None:  # data loader workers follow it (finetune_trainer.speed)
        env.append(
            {
                "name": CPU_REQUEST_ENV,
                "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}},
            }
        )
    gpus = job_gpus(job.spec.resources.to_wire())
    if gpus.memory is not None:  # what the trainer's memory plan checks against where CUDA cannot say
        env.append({"name": GPU_MEMORY_ENV, "value": str(gpus.memory)})
    for name, secret in (
        (HF_TOKEN_ENV, job.spec.model.token_secret_ref),
        (DATASET_HF_TOKEN_ENV, job.spec.dataset.token_secret_ref),
    ):
        if secret is not None:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    tracking = job.spec.tracking
    if tracking is not None and tracking.credentials_secret_ref is not None:
        # Only the keys the MLflow client reads, each optional (user + password, or a token): the trainer's
        # environment never takes a key it does not expect from the Secret.
        name = tracking.credentials_secret_ref.name
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": True}}}
            for key in TRACKING_SECRET_KEYS
        ]
    env += _s3_credentials_env(job)
    if job.spec.resources.nodes > 1:
        env += [
            {"name": "MASTER_ADDR", "value": f"{names.job}-0.{names.service}"},
            {"name": "MASTER_PORT", "value": str(settings.rendezvous_port)},
            {"name": "NNODES", "value": str(job.spec.resources.nodes)},
            {"name": "NPROC_PER_NODE", "value": str(max(job.spec.resources.gpus_per_node, 1))},
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            },
        ]
    env += [{"name": k, "value": v} for k, v in sorted(settings.extra_env.items())]
    return env


def _entrypoint(job: FineTuneJob, settings: Settings) -> tuple[list[str] | None, list[str]]:
    """(command, args). One process per pod runs the image's own entrypoint (finetune-trainer), so
    a custom trainer image works unchanged; several GPUs or nodes go through torchrun, wrapped by
    finetune_trainer.launch so that the pod exits with the trainer's exit code, not torchrun's 1."""
    args = ["--config", f"{settings.config_dir}/{CONFIG_FILE}"]
    resources = job.spec.resources
    if resources.nodes == 1 and resources.gpus_per_node <= 1:
        return None, args
    rendezvous = (
        [
            "--nnodes=$(NNODES)",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
        if resources.nodes > 1
        else ["--nnodes=1", "--standalone"]
    )
    return ["python", "-m", "finetune_trainer.launch"], [
        *rendezvous,
        f"--nproc-per-node={max(resources.gpus_per_node, 1)}",
        "-m",
        "finetune_trainer.cli",
        *args,
    ]


def _resources(job: FineTuneJob, settings: Settings) -> Manifest:
    spec = job.spec.resources
    requests: dict[str, Any] = {}
    if spec.cpu is not None:
        requests["cpu"] = str(spec.cpu)
    if spec.memory is not None:
        requests["memory"] = str(spec.memory)
    limits = dict(requests)
    if spec.ephemeral_storage is not None:  # opt-in: a request (or a limit, copied to it) that a ClusterQueue
        # without ephemeral-storage would never admit; the scratch volume's sizeLimit bounds the disk either way
        limits["ephemeral-storage"] = str(spec.ephemeral_storage)
        requests["ephemeral-storage"] = min(
            (str(spec.ephemeral_storage), settings.ephemeral_storage_request), key=quantity_value
        )
    if spec.gpus_per_node:
        limits[spec.gpu_resource_name] = str(spec.gpus_per_node)
        requests[spec.gpu_resource_name] = str(spec.gpus_per_node)
    return {k: v for k, v in {"requests": requests, "limits": limits}.items() if v}


def pod_template(job: FineTuneJob, settings: Settings, config: str | None = None) -> Manifest:
    """A pod that passes the `restricted` Pod Security Standard and runs the trainer (``config``: as in
    ``config_map``)."""
    names = Names.for_job(job)
    spec = job.spec.resources
    mounts = [
        {"name": "config", "mountPath": settings.config_dir, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        # /tmp holds the Hugging Face cache (HF_HOME): bounded, so a runaway download ends in an eviction.
        {"name": "tmp", "emptyDir": {"sizeLimit": str(spec.ephemeral_storage or DEFAULT_SCRATCH)}},
    ]
    for index, (claim, read_only) in enumerate(_claims(job)):
        mount = {"name": f"pvc-{index}", "mountPath": f"{settings.pvc_root}/{claim}"}
        mounts.append({**mount, "readOnly": True} if read_only else mount)
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
    if spec.gpus_per_node > 1 or spec.nodes > 1:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    command, args = _entrypoint(job, settings)
    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": _env(job, settings, names),
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port}],
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if command is not None:
        container["command"] = command
    resources = _resources(job, settings)
    if resources:
        container["resources"] = resources
    pod: Manifest = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account_name or names.service_account,
        "automountServiceAccountToken": True,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            # re-group a claim's files only when its root is not the group's yet: not on every start
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [t.to_wire() for t in spec.tolerations]
    if spec.affinity:
        pod["affinity"] = spec.affinity
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.nodes > 1:
        pod["subdomain"] = names.service
    config_hash = hashlib.sha256((training_config(job) if config is None else config).encode()).hexdigest()[:16]
    return {"metadata": {"labels": labels(job), "annotations": {CONFIG_HASH_ANNOTATION: config_hash}}, "spec": pod}


def batch_job(
    job: FineTuneJob, settings: Settings, *, suspend: bool | None = None, config: str | None = None
) -> Manifest:
    """The batch/v1 Job: retries, deadlines, suspend and podFailurePolicy come from the Job controller."""
    names = Names.for_job(job)
    nodes = job.spec.resources.nodes
    spec: Manifest = {
        # A queued Job starts suspended: Kueue alone unsuspends it (and suspends it again to preempt it).
        "suspend": (job.spec.suspend or job.queue_name is not None) if suspend is None else suspend,
        "backoffLimit": job.spec.backoff_limit,
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": sorted(exitcodes.PERMANENT),
                    },
                },
                # The trainer saved a checkpoint on SIGTERM (preemption, drain, graceful eviction): resumable,
                # not a failure.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [exitcodes.TERMINATED.code],
                    },
                },
                # Any other death counts, evictions included (kubelet evictions kill at once, so the trainer
                # cannot save): otherwise a pod outgrowing its disk is evicted and replaced forever.
                {
                    "action": "Count",
                    "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "NotIn", "values": [0]},
                },
                # Disrupted before the trainer ran (e.g. preempted while Pending): nothing lost, not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": pod_template(job, settings, config),
    }
    if nodes > 1:
        spec["completionMode"] = "Indexed"
    if job.spec.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.spec.active_deadline_seconds
    # No ttlSecondsAfterFinished here: the operator sets it once it has recorded the result
    # (``steer.steer``, done after the status write), so the Job controller never deletes a result nobody read.
    metadata = _metadata(job, names.job)
    metadata["labels"].update(kueue_labels(job))
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}
    # The hash ignores `suspend` and the queue label: toggling them is an update of the Job, not a new Job.
    stamped = _stamped({**manifest, "spec": {**spec, "suspend": False}})
    stamped["spec"]["suspend"] = spec["suspend"]
    if job.spec.suspend:
        # Kueue admits (and unsuspends) any Job that names a queue; a Job has no `active` field, and Kueue's
        # Workload, which has one, appears only after the Job: a Job the user suspended names no queue until
        # the user resumes it (the operator adds the label then), so no Workload exists that Kueue could admit.
        stamped["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL, None)
    return stamped


def kueue_labels(job: FineTuneJob) -> dict[str, str]:
    """What Kueue reads on the Job: the LocalQueue, and a WorkloadPriorityClass named on the FineTuneJob."""
    found = {KUEUE_QUEUE_LABEL: job.queue_name} if job.queue_name is not None else {}
    priority = job.metadata.labels.get(KUEUE_PRIORITY_LABEL)
    return {**found, KUEUE_PRIORITY_LABEL: priority} if priority else found


def child_refs(ftj_name: str, *, nodes: int, service_account_name: str | None) -> list[tuple[str, str]]:
    """(kind, name) of every child a spec of this shape asks for, in creation order (the trainer Job last):
    what ``desired_children`` builds, and what the resync looks for without parsing the spec."""
    names = Names.of(ftj_name, multi_node=nodes > 1)
    refs = [("ConfigMap", names.config_map)]
    if service_account_name is None:
        refs.append(("ServiceAccount", names.service_account))
    refs += [("Role", names.role), ("RoleBinding", names.role)]
    if nodes > 1:
        refs.append(("Service", names.service))
    return [*refs, ("Job", names.job)]


def desired_children(job: FineTuneJob, settings: Settings, *, trainer_job: bool = True) -> list[Manifest]:
    """Everything a FineTuneJob owns, in creation order (config and RBAC before the Job); without the
    trainer Job (the costly one to render) when only the others' content is wanted. The training
    config is rendered once for the ConfigMap and the Job's config hash."""
    config = training_config(job)
    build: dict[str, Callable[[], Manifest]] = {
        "ConfigMap": lambda: config_map(job, config),
        "ServiceAccount": lambda: service_account(job),
        "Role": lambda: role(job),
        "RoleBinding": lambda: role_binding(job),
        "Service": lambda: headless_service(job, settings),
        "Job": lambda: batch_job(job, settings, config=config),
    }
    resources = job.spec.resources
    refs = child_refs(job.metadata.name, nodes=resources.nodes, service_account_name=resources.service_account_name)
    return [build[kind]() for kind, _ in refs if trainer_job or kind != "Job"]


def content_hashes(children: list[Manifest]) -> dict[tuple[str, str], str]:
    """``content_hash`` of each child that has content, by (kind, name)."""
    hashes = {(c["kind"], c["metadata"]["name"]): content_hash(c) for c in children}
    return {ref: held for ref, held in hashes.items() if held is not None}
