"""Image tags are a hash of what each image is built from: same inputs, same tag; any change, a new one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune_devtools import images


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("Dockerfile", "constraints.txt", "trainer/pyproject.toml", "operator/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images.REPO / name, tmp_path / name)
    for package in ("trainer/src/finetune_trainer", "operator/src/finetune_operator"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text('"""x"""\n')
    monkeypatch.setattr(images, "REPO", tmp_path)
    return tmp_path


def test_the_tag_changes_with_any_input_and_only_with_inputs(repo: Path) -> None:
    operator, trainer = images.content_tag("operator", "base-1"), images.content_tag("trainer", "base-1")
    assert operator != trainer
    # Build leftovers (bytecode, egg-info) stay out of the image and out of the hash.
    (repo / "operator/src/finetune_operator/__pycache__").mkdir()
    (repo / "operator/src/finetune_operator/__pycache__/x.pyc").write_bytes(b"\0")
    (repo / "operator/src/finetune_operator.egg-info").mkdir()
    (repo / "operator/src/finetune_operator.egg-info/PKG-INFO").write_text("x")
    assert images.content_tag("operator", "base-1") == operator
    # The operator is built from the trainer's torch-free core too; the trainer never from the operator.
    (repo / "operator/src/finetune_operator/new.py").write_text("x = 1\n")
    assert images.content_tag("operator", "base-1") != operator
    assert images.content_tag("trainer", "base-1") == trainer
    (repo / "trainer/src/finetune_trainer/__init__.py").write_text('"""y"""\n')
    assert images.content_tag("trainer", "base-1") != trainer
    assert images.content_tag("trainer", "base-2") != images.content_tag("trainer", "base-1"), "a new base"


def test_a_missing_podman_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images.shutil, "which", lambda _: None)
    with pytest.raises(
        images.BuildError, match=r"podman is not installed: run `dev/install-system-deps.sh containers`"
    ):
        images.podman()


def test_the_trainer_is_a_thin_layer_on_a_dependency_image_keyed_by_its_requirements(repo: Path) -> None:
    deps, trainer = images.content_tag("trainer-deps", "base-1"), images.content_tag("trainer", "deps-1")
    # The trainer's code: a new thin layer, the several-GB dependency image stays.
    (repo / "trainer/src/finetune_trainer/train.py").write_text("x = 1\n")
    assert images.content_tag("trainer-deps", "base-1") == deps
    assert images.content_tag("trainer", "deps-1") != trainer
    trainer = images.content_tag("trainer", "deps-1")
    # The operator's stage of the Dockerfile and any comment: neither trainer image changes.
    dockerfile = repo / "Dockerfile"
    text = dockerfile.read_text()
    dockerfile.write_text(text.replace('CMD ["run", "--log-format", "json"]', 'CMD ["run"]') + "\n# a comment\n")
    assert images.content_tag("trainer-deps", "base-1") == deps
    assert images.content_tag("trainer", "deps-1") == trainer
    # A pin in constraints.txt: new dependencies, so a new dependency image and a new trainer on it.
    constraints = repo / "constraints.txt"
    constraints.write_text(constraints.read_text().replace("\ntqdm==", "\ntqdm==0.0.1+"))
    assert images.content_tag("trainer-deps", "base-1") != deps
    assert images.content_tag("trainer", "deps-2") != trainer, "the trainer is keyed by its dependency image"


def test_a_pin_the_trainer_does_not_install_keeps_its_dependency_image(repo: Path) -> None:
    """constraints.txt pins the whole project (dev tools, the operator's optuna): only the pins of what
    ``trainer[train]`` pulls in key the 6.6 GB layer, else any dev-tool pin rebuilds it (~4 min)."""
    deps, operator = images.content_tag("trainer-deps", "base-1"), images.content_tag("operator", "base-1")
    constraints = repo / "constraints.txt"
    constraints.write_text(constraints.read_text().replace("\noptuna==", "\noptuna==0.0.1+") + "black==24.1.0\n")
    assert images.content_tag("trainer-deps", "base-1") == deps
    assert images.content_tag("operator", "base-1") != operator, "the operator installs optuna"
    assert "torch==" in images.pins(("trainer[train]",)) and "optuna==" not in images.pins(("trainer[train]",))
    assert "optuna==" in images.pins(("trainer", "operator")) and "torch==" not in images.pins(("trainer", "operator"))


def test_the_dockerfile_stages_are_what_the_tags_hash() -> None:
    stages = images.dockerfile_stages((images.REPO / "Dockerfile").read_text())
    assert set(stages) == {"", "base", "operator", "trainer-deps", "trainer"}
    assert stages["trainer"].startswith("FROM trainer-deps AS trainer"), "make images swaps in its cached image"
    assert "pip install --no-deps" in stages["trainer"], "the thin layer installs only the trainer package"
    assert all(not line.lstrip().startswith("#") for stage in stages.values() for line in stage.splitlines())


def test_the_trainer_is_built_after_its_dependency_image() -> None:
    assert images._build_order(("trainer",)) == ["trainer-deps", "trainer"]
    assert images._build_order(("operator", "trainer")) == ["operator", "trainer-deps", "trainer"]
    assert images._build_order(("operator",)) == ["operator"]
