"""Every name derived from a FineTuneJob's (or a sweep's) name is valid for every shape the job can take:
any object name the API server accepts, one node or up to the largest node count, every pod index."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_operator.api.job import MAX_NODES, FineTuneJob
from finetune_operator.api.sweep import MAX_TRIALS
from finetune_operator.reconcile import Settings, desired_children
from finetune_operator.reconcile.children import Names, job_label_value
from finetune_operator.reconcile.sweep import trial_name
from tests.manifests import baseline

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label, at most 63
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # a Service's name, at most 63
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # at most 253
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # at most 63


def _label(first: str) -> st.SearchStrategy[str]:
    inner = st.text(alphabet="abcxyz0189-", max_size=62)
    return st.builds(lambda a, b: (a + b).rstrip("-") or a, st.sampled_from(first), inner)


def object_names(first: str = "abz019") -> st.SearchStrategy[str]:
    """Names the API server accepts for a custom object: DNS subdomains of up to 253 characters."""
    labels = st.lists(_label("abz019"), min_size=0, max_size=5)
    return st.builds(lambda head, rest: ".".join([head, *rest])[:253].rstrip("-.") or head, _label(first), labels)


def valid_subdomain(name: str) -> bool:
    return len(name) <= 253 and DNS_SUBDOMAIN.match(name) is not None


def valid_label(name: str) -> bool:
    return len(name) <= 63 and DNS_LABEL.match(name) is not None


def assert_names_valid(name: str, nodes: int) -> None:
    """What the API server checks on each child, and on the pods the Job controller makes of the Job."""
    manifest = baseline(name)
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1"})
    manifest["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": 1}
    job = FineTuneJob.model_validate(manifest)
    names = Names.for_job(job)
    for child in desired_children(job, Settings()):
        assert valid_subdomain(child["metadata"]["name"]), child["metadata"]["name"]
        assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in child["metadata"]["labels"].values())
    assert len(names.job) <= 63 and LABEL_VALUE.match(names.job), "the Job's name is its pods' job-name label"
    assert len(job_label_value(name)) <= 63 and LABEL_VALUE.match(job_label_value(name))
    if nodes > 1:
        assert len(names.service) <= 63 and DNS_1035_LABEL.match(names.service), names.service
        for index in (0, nodes - 1, MAX_NODES - 1):  # the Job controller names each pod's hostname so
            assert valid_label(f"{names.job}-{index}"), f"{names.job}-{index}"


@settings(max_examples=100, deadline=None)
@given(name=object_names(), nodes=st.sampled_from([1, 2, 10, 11, MAX_NODES]))
def test_every_derived_name_is_valid(name: str, nodes: int) -> None:
    if nodes > 1 and not name[0].isalpha():
        nodes = 1  # the CRD refuses a multi-node job whose name starts with a digit
    assert_names_valid(name, nodes)


@settings(max_examples=40, deadline=None)
@given(sweep=object_names(first="abz"), index=st.sampled_from([0, 7, MAX_TRIALS - 1]), nodes=st.sampled_from([1, 4]))
def test_trial_names_are_valid_job_names(sweep: str, index: int, nodes: int) -> None:
    trial = trial_name(sweep, index)
    assert valid_subdomain(trial), trial
    assert trial != trial_name(sweep, index + 1)
    assert_names_valid(trial, nodes)


def test_the_issue_case_and_the_longest_names() -> None:
    """A 60-character name on 2 nodes gave a 63-character Job, so pod hostnames ``<job>-<index>`` had 65."""
    for length in (50, 51, 55, 60, 63, 253):
        assert_names_valid("a" * length, 2)
        assert_names_valid("a" * length, MAX_NODES)
    assert Names.of("a" * 50, multi_node=True).job == "a" * 50 + "-trainer", "short enough: unchanged"
    assert Names.of("a" * 51, multi_node=True).job != Names.of("a" * 52, multi_node=True).job
    assert Names.of("a" * 55).job == "a" * 55 + "-trainer", "single-node names are unchanged"
    assert valid_subdomain(trial_name("a" * 253, MAX_TRIALS - 1)), "a trial of the longest sweep name"
