"""Apply-time advice in Python (``kubectl finetune advise``) and its generated admission policy."""

from __future__ import annotations

import inspect
import io
import itertools
import re
from pathlib import Path

import pytest
import yaml

from finetune_cli.main import cmd_advise, main
from finetune_operator.api.job import FineTuneJob
from finetune_operator.generators.advice_policy import CHART_POLICY_FILE, POLICY_FILE, build_policy, render_policy
from finetune_operator.reconcile import diagnosis
from finetune_trainer.advice import RULES, admission_expression, advise
from tests.advice_cases import CASES, Case, manifest
from tests.manifests import EXAMPLES, baseline, example

ROOT = Path(__file__).resolve().parents[2]


def _reasons(m: dict[str, object]) -> list[str]:
    return [a.reason for a in advise(FineTuneJob.model_validate(m).spec)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_case_gets_exactly_its_warning(case: Case) -> None:
    assert _reasons(manifest(case)) == ([case.reason] if case.reason else [])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_get_no_advice(path: Path) -> None:
    assert _reasons(example(path)) == []


def test_every_rule_has_a_case_and_names_its_field() -> None:
    assert {r.reason for r in RULES} == {c.reason for c in CASES if c.reason}
    for rule in RULES:
        assert rule.message.startswith(rule.field.split(".")[0]), rule.message


def test_advice_never_raises_on_valid_specs() -> None:
    """Every combination of the knobs the rules read: valid specs always get a list, never an exception."""
    knobs = itertools.product(
        ["none", "head-only", "bottom-layers", "lora"],
        [None, 3e-5, 1.0],
        [None, 1, 20],
        [None, {"metric": "loss", "restoreBest": False}],
        [True, False],
    )
    for strategy, rate, epochs, stopping, checkpointing in knobs:
        m = baseline()
        spec = m["spec"]
        spec["freeze"] = {"strategy": strategy, **({"layers": 1} if strategy == "bottom-layers" else {})}
        spec["hyperparameters"] = {"gradientCheckpointing": checkpointing, "labelSmoothing": 0.1}
        if rate is not None:
            spec["hyperparameters"]["learningRate"] = rate
        if epochs is not None:
            spec["hyperparameters"]["epochs"] = epochs
        spec["earlyStopping"] = stopping
        if stopping is None:
            del spec["earlyStopping"]
        assert isinstance(_reasons(m), list)


def test_policy_files_match_the_rules() -> None:
    assert (ROOT / POLICY_FILE).read_text() == render_policy(), "policy is stale: run `make crds`"
    assert (ROOT / CHART_POLICY_FILE).read_text() == render_policy(), "chart policy is stale: run `make crds`"


def test_policy_only_warns_and_never_fails_a_request() -> None:
    policy, binding = build_policy()
    assert binding["spec"]["validationActions"] == ["Warn"]
    assert policy["spec"]["failurePolicy"] == "Ignore"
    expressions = [v["expression"] for v in policy["spec"]["validations"]]
    assert expressions == [admission_expression(r) for r in RULES]
    assert not any("self" in e.replace("object.spec", "") for e in expressions)


def test_chart_renders_the_policy() -> None:
    template = (ROOT / "charts" / "finetune-operator" / "templates" / "advice-policy.yaml").read_text()
    assert '.Files.Get "files/advice-policy.yaml"' in template
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    assert values["advicePolicy"]["enabled"] is True


def test_cli_advise_prints_the_same_warnings_offline(tmp_path: Path) -> None:
    bad = manifest(next(c for c in CASES if c.reason == "HighLearningRate"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(bad))
    out, err = io.StringIO(), io.StringIO()
    assert cmd_advise(str(path), out, err) == 0
    rule = next(r for r in RULES if r.reason == "HighLearningRate")
    assert out.getvalue().splitlines()[0] == f"Warning: {rule.message}" and err.getvalue() == ""


def test_cli_advise_says_so_when_there_is_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    assert cmd_advise(str(EXAMPLES[0]), out, io.StringIO()) == 0
    assert "no advice" in out.getvalue()


def test_cli_advise_rejects_an_invalid_spec_in_one_line(tmp_path: Path) -> None:
    m = baseline()
    m["spec"]["hyperparameters"]["learningRate"] = -1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(m))
    err = io.StringIO()
    assert cmd_advise(str(path), io.StringIO(), err) == 1
    assert err.getvalue().startswith("error: ") and "learningRate" in err.getvalue()
    assert len(err.getvalue().splitlines()) == 1


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("file:///nowhere/minilm", "model.source file:///nowhere/minilm is not reachable here (/nowhere/minilm is not"),
        ("pvc://models/minilm", "FINETUNE_PVC_ROOT says where the claims are mounted"),
        ("hf://org/model", "model.source hf://org/model is on the Hugging Face Hub and advise stays offline"),
    ],
)
def test_cli_advise_says_why_there_is_no_layer_map(source: str, why: str, tmp_path: Path) -> None:
    """No model on this machine: one line that says why and where to run --plan, never a download or a traceback."""
    m = baseline()
    m["spec"]["model"]["source"] = source
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(m))
    out = io.StringIO()
    assert cmd_advise(str(path), out, io.StringIO()) == 0
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("Layer map: not shown: ") and why in last, last
    assert last.endswith("run `finetune-trainer --config FILE --plan` where the model is")


def test_docs_list_every_warning_and_diagnosis() -> None:
    """docs/advice.md is the reference users read: a rule or a diagnosis without its row there fails here."""
    docs = (ROOT / "docs" / "advice.md").read_text()
    rows = {line.split("|")[1].strip() for line in docs.splitlines() if line.startswith("| `")}
    assert {f"`{rule.field}`" for rule in RULES} <= rows
    codes = set(re.findall(r'code="(\w+)"', inspect.getsource(diagnosis)))
    assert len(codes) >= 6 and {f"`{code}`" for code in codes} <= rows, codes


def test_cli_advise_no_layer_map_skips_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(baseline()))
    with pytest.raises(SystemExit) as exited:
        main(["advise", "-f", str(path), "--no-layer-map"])
    assert exited.value.code == 0
    assert "Layer map" not in capsys.readouterr().out
