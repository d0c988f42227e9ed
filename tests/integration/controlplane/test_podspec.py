"""The pure pod-spec rules of the node agent (no cluster needed)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from finetune_localcluster import podspec


def test_var_expansion_follows_kubelet_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert podspec.expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"
    assert podspec.expand("$(cat /x) $HOME", env) == "$(cat /x) $HOME"


def test_mount_paths_are_rewritten_only_as_whole_prefixes() -> None:
    mounts = [("/data", "/h/d"), ("/data/sub", "/h/s"), ("/etc/cfg", "/h/c")]
    assert podspec.rewrite_paths("/data/x /data/sub/y /data", mounts) == "/h/d/x /h/s/y /h/d"
    assert podspec.rewrite_paths("--out=/data/o,/etc/cfg:ro", mounts) == "--out=/h/d/o,/h/c:ro"
    assert podspec.rewrite_paths("/mnt/data/x /database /etc/cfgx", mounts) == "/mnt/data/x /database /etc/cfgx"


def test_sa_mount_is_exported() -> None:
    env = podspec.mounts_env([(podspec.SA_MOUNT, "/h/sa")])
    assert env["FINETUNE_SA_DIR"] == "/h/sa"
    assert json.loads(env["FINETUNE_MOUNTS"]) == {podspec.SA_MOUNT: "/h/sa"}


@pytest.mark.parametrize(
    ("q", "value"),
    [("500m", Decimal("0.5")), ("2Gi", Decimal(2**31)), ("1e3", Decimal(1000)), ("64Mi", Decimal(64 * 2**20))],
)
def test_quantities(q: str, value: Decimal) -> None:
    assert podspec.parse_quantity(q) == value


def test_resource_field_ref_rounds_up_and_defaults_limits_to_node() -> None:
    pod = {"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "250m"}}}]}}
    assert podspec.resource_value(pod, {"resource": "requests.cpu"}, "c", {}) == "1"
    assert podspec.resource_value(pod, {"resource": "requests.cpu", "divisor": "1m"}, "c", {}) == "250"
    assert podspec.resource_value(pod, {"resource": "limits.memory", "divisor": "1Ki"}, "c", {"memory": "8Ki"}) == "8"


def test_field_refs() -> None:
    pod = {"metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"}, "annotations": {"x/y": "1"}}}
    assert podspec.field_value(pod, "metadata.labels['a']") == "b"
    assert podspec.field_value(pod, "metadata.annotations['x/y']") == "1"
    assert podspec.field_value(pod, "status.podIP") == "127.0.0.1"


def test_image_map(tmp_path: Path) -> None:
    assert podspec.image_command("ghcr.io/acme/finetune-trainer:1.0") == (["finetune-trainer"], [])
    assert podspec.image_command("busybox:1.36") == ([], ["/bin/sh"])
    assert podspec.image_command("registry/unknown:1") is None
    custom = tmp_path / "map.yaml"
    custom.write_text("- {match: 'unknown', entrypoint: [echo, hi]}\n")
    assert podspec.image_command("registry/unknown:1", str(custom)) == (["echo", "hi"], [])
