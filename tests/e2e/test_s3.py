"""``s3://`` end to end: the real trainer in real pods on the local control plane, against the project's S3
server (SeaweedFS, authentication on), credentials from a Secret.

One job reads its model and data from the bucket, writes checkpoints and the final model there, is
killed mid-run (SIGKILL: a crash, retried), resumes from the bucket on a fresh pod (its scratch is
new, no volume is shared) and completes; the published manifest's sha256 is the one in the bucket.
A job with wrong credentials fails at once with ModelError, the field and the URI in its message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from kubernetes import client

from finetune_devtools.seaweedfs import S3Endpoint
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer import exitcodes, s3
from finetune_trainer.config import local_path
from finetune_trainer.manifest import MANIFEST_NAME, Manifest
from finetune_trainer.spec import S3Storage
from tests.e2e.conftest import RealNamespace, container_pid, real_job, s3_published, s3_secret, s3_test_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket(s3_server: S3Endpoint, real_namespace: RealNamespace) -> Iterator[tuple[str, S3Storage]]:
    """A bucket holding tiny-bert and the sentiment data, the settings to reach it, and the Secrets."""
    with pytest.MonkeyPatch.context() as env:
        settings = s3_test_env(env, s3_server)
        name = f"e2e-{uuid.uuid4().hex[:10]}"
        root = real_namespace.volumes.parent
        s3.publish(root / "models" / "tiny-bert", f"s3://{name}/models/tiny-bert", settings)
        s3.publish(root / "datasets" / "sentiment", f"s3://{name}/datasets/sentiment", settings)
        api, namespace = real_namespace.jobs.api, real_namespace.jobs.namespace
        s3_secret(api, namespace, s3_server, "s3-credentials")
        s3_secret(api, namespace, s3_server, "s3-wrong", secret_key="not-the-key")
        # created now, checked by its test: it fails at once (before torch loads), beside the resumed job
        wrong = {**settings.to_wire(), "credentialsSecretRef": {"name": "s3-wrong"}}
        real_namespace.jobs.create(
            real_job("s3-wrong", backoffLimit=2, model={"source": f"s3://{name}/models/tiny-bert", "s3": wrong})
        )
        yield name, settings


def _events(core: client.CoreV1Api, namespace: str, pod: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in core.read_namespaced_pod_log(pod, namespace).splitlines() if line[:1] == "{"]


def test_a_job_killed_mid_run_resumes_from_the_bucket_on_a_fresh_pod(
    real_namespace: RealNamespace, local_cluster: LocalCluster, bucket: tuple[str, S3Storage]
) -> None:
    name, settings = bucket
    jobs = real_namespace.jobs
    out = f"s3://{name}/runs/resumed"
    jobs.create(
        real_job(
            "s3-resumed",
            backoffLimit=2,
            model={"source": f"s3://{name}/models/tiny-bert"},
            dataset={"source": f"s3://{name}/datasets/sentiment"},
            hyperparameters={"epochs": 6},  # 48 steps: the kill after the first checkpoint (20) lands mid-run
            evaluation={"strategy": "steps", "interval": 20},
            output={"location": out},
            storage={"s3": settings.to_wire()},
        )
    )
    s3_published(settings, f"{out}/checkpoints")
    core = client.CoreV1Api(jobs.api)
    selector = "batch.kubernetes.io/job-name=s3-resumed-trainer"
    (first,) = core.list_namespaced_pod(jobs.namespace, label_selector=selector).items
    os.kill(container_pid(local_cluster, first), signal.SIGKILL)  # a crash: the Job retries on a fresh pod
    # The local node does not bind a pod's /tmp emptyDir over the host's /tmp when that would hide the
    # cluster's own state (under pytest's /tmp): remove what the first pod left there, as a new node has none.
    shutil.rmtree(local_path(out, Path("/")).parent, ignore_errors=True)
    shutil.rmtree(Path(tempfile.gettempdir()) / s3.DEFAULT_CACHE, ignore_errors=True)
    status = jobs.wait_condition("s3-resumed", "Complete", "Succeeded", timeout=400)["status"]
    pods = core.list_namespaced_pod(jobs.namespace, label_selector=selector).items
    assert len(pods) == 2, "one crash, one retry"
    second = next(p for p in pods if p.metadata.name != first.metadata.name)
    assert not [v for v in second.spec.volumes or [] if v.persistent_volume_claim], "no volume is shared"
    events = _events(core, jobs.namespace, second.metadata.name)
    downloads = [e for e in events if e["event"] == "s3_download"]
    restored = [e for e in events if e["event"] == "s3_restore"]
    resumed = [e for e in events if e["event"] == "resume"]
    assert [d["cached"] for d in downloads] == [False, False], downloads
    assert restored and resumed and int(str(resumed[0]["step"])) >= 20, events[:8]
    manifest = s3.published(f"{out}/model", settings)
    assert isinstance(manifest, Manifest) and any(entry.path == "config.json" for entry in manifest.files)
    store = s3.S3Location.parse(out, settings, "output").store()
    remote = bytes(obstore.get(store, f"runs/resumed/model/{MANIFEST_NAME}").bytes())
    assert Manifest.model_validate_json(remote).sha256 == manifest.sha256
    # status names what is in the bucket: the best's checkpoint is published, the base model is the URI as written
    assert s3.published(status["best"]["checkpoint"], settings) is not None, status["best"]
    assert status["artifacts"][0]["baseModel"]["source"] == f"s3://{name}/models/tiny-bert", status["artifacts"]


def test_wrong_credentials_fail_the_job_at_once_naming_the_field(
    real_namespace: RealNamespace, bucket: tuple[str, S3Storage]
) -> None:
    name, _ = bucket
    jobs = real_namespace.jobs  # the job was created with the bucket
    status = jobs.wait_condition("s3-wrong", "Failed", exitcodes.MODEL_ERROR.reason, timeout=300)["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert f"model.source: s3://{name}/models/tiny-bert" in failed["message"], failed
