"""The pure rendering of the plugin: list rows, progress line, describe text, outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from finetune_cli.render import (
    best_point,
    describe,
    final_line,
    human_duration,
    list_row,
    list_table,
    outcome,
    parse_job,
    progress_bar,
    progress_line,
)
from tests.cli.jobs import early_stopped_status, failed_status, job, running_status

NOW = datetime(2026, 1, 1, 0, 5, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (119, "119s"),
        (330, "5m30s"),
        (600, "10m"),
        (12000, "3h20m"),
        (30 * 3600, "30h"),
        (4 * 86400, "4d"),
        (400 * 86400, "400d"),
    ],
)
def test_human_duration_matches_kubectl(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


def test_list_row_of_a_running_job() -> None:
    row = list_row(parse_job(job(status=running_status())), NOW)
    assert row == ["demo", "Running", "50%", "150/300", "1.5/3", "accuracy=0.84", "0.86@100", "5m30s"]


def test_list_row_without_status_is_pending_with_dashes() -> None:
    assert list_row(parse_job(job()), NOW) == ["demo", "Pending", "-", "-", "-", "-", "-", "5m30s"]


def test_list_table_aligns_columns_and_adds_namespace_for_all_namespaces() -> None:
    jobs = [parse_job(job("a", running_status(), "ns1")), parse_job(job("longer-name", None, "ns2"))]
    lines = list_table(jobs, NOW, all_namespaces=True).splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "PHASE", "PROGRESS", "STEP", "EPOCH", "METRIC", "BEST", "AGE"]
    assert lines[0].index("PHASE") == lines[1].index("Running") == lines[2].index("Pending")


def test_progress_line_shows_step_epoch_loss_metric_and_eta() -> None:
    line = progress_line(parse_job(job(status=running_status())))
    assert line == (
        "demo Running [##########----------]  50% step 150/300 epoch 1.5/3 loss 0.3812 "
        "eval accuracy 0.84 (best 0.86@100) ETA 3m20s"
    )


def test_progress_line_before_the_first_report() -> None:
    assert progress_line(parse_job(job())) == "demo Pending: waiting for the trainer's first report"


def test_progress_bar_bounds() -> None:
    assert progress_bar(0, 4) == "[----]"
    assert progress_bar(100, 4) == "[####]"
    assert progress_bar(250, 4) == "[####]"


def test_outcome_reads_conditions_not_phase() -> None:
    assert outcome(parse_job(job(status=running_status())).status) is None
    done = outcome(parse_job(job(status=early_stopped_status())).status)
    assert done is not None and (done.type, done.reason) == ("Complete", "EarlyStopped")
    failed = outcome(parse_job(job(status=failed_status())).status)
    assert failed is not None and failed.type == "Failed"
    assert final_line(parse_job(job(status=failed_status()))) == (
        "demo Failed (TrainerError): trainer exited with code 1: CUDA OOM"
    )


def test_best_point_is_recomputed_from_history_when_the_operator_has_not_recorded_it() -> None:
    status = running_status()
    del status["best"], status["earlyStopping"]
    best = best_point(parse_job(job(status=status)))
    assert best is not None and (best.metric, best.value, best.step) == ("accuracy", 0.86, 100)


def test_describe_covers_spec_status_conditions_evaluations_why_and_best() -> None:
    text = describe(parse_job(job(status=early_stopped_status())), NOW)
    for expected in (
        "Name:       demo",
        "Model:            file:///models/minilm (sequence-classification, 2 labels)",
        "Freeze:           bottom-layers (2 layers)",
        "lr=3e-05 linear, batch=16x1, epochs=3",
        "Early stopping:   accuracy (max), patience 2, minDelta 0, restore best",
        "Outcome:    Complete (EarlyStopped)",
        "Why it stopped: Early stopping: accuracy did not improve by more than 0.0 (max) for 2 evaluations; "
        "best 0.86 at step 100",
        "accuracy=0.86 at step 100: file:///out/ckpt-100",
    ):
        assert " ".join(expected.split()) in " ".join(text.split()), f"{expected!r} not in:\n{text}"
    evaluations = text.split("Evaluations:\n")[1].split("Why it stopped:")[0].splitlines()
    assert evaluations[0].split() == ["STEP", "EPOCH", "LOSS", "ACCURACY", "F1", "BEST"]
    assert [line.split()[0] for line in evaluations[1:]] == ["50", "100", "150", "200"]
    assert evaluations[2].rstrip().endswith("*") and not evaluations[3].rstrip().endswith("*")
    assert "Regularization: maxGradNorm=1" in " ".join(text.split())
    assert "  TYPE       STATUS   REASON" in text
    assert "early stopping: early stopping" not in text.lower(), "the rule's words do not repeat the label"


def test_describe_of_a_failed_job_says_why() -> None:
    text = describe(parse_job(job(status=failed_status())), NOW)
    assert "Why it stopped:\n  Failed (TrainerError): trainer exited with code 1: CUDA OOM" in text


def test_an_unparseable_spec_still_renders_from_status() -> None:
    obj = job(status=running_status())
    obj["spec"]["hyperparameters"]["fromTheFuture"] = True
    parsed = parse_job(obj)
    assert parsed.spec is None and parsed.parse_error
    assert "<could not be read:" in describe(parsed, NOW + timedelta(days=1))
    assert list_row(parsed, NOW)[2] == "50%"


def test_describe_shows_the_mlflow_run_and_why_tracking_is_behind() -> None:
    body = job(status=running_status())
    body["status"]["tracking"] = {
        "runId": "abc123",
        "url": "http://mlflow:5000/#/experiments/1/runs/abc123",
        "registeredModel": "sentiment",
        "registeredVersion": "3",
        "behind": True,
        "message": "MLflow at http://mlflow:5000: ConnectionError",
    }
    text = describe(parse_job(body), NOW)
    tracking = text.split("Tracking (MLflow):\n")[1]
    for expected in (
        "Run:         abc123",
        "URL:         http://mlflow:5000/#/experiments/1/runs/abc123",
        "Registered:  sentiment version 3",
        "Behind:      MLflow at http://mlflow:5000: ConnectionError",
    ):
        assert " ".join(expected.split()) in " ".join(tracking.split()), f"{expected!r} not in:\n{text}"
    assert "Tracking (MLflow):" not in describe(parse_job(job(status=running_status())), NOW)
