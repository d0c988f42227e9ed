"""The operator as its image runs it, from the dev venv (``operator_scale.py``'s launcher; the operator itself
knows nothing of it).

    python benchmarks/deployed_operator.py MODULE,MODULE,... [finetune-operator arguments ...]

The dev venv holds distributions the operator image does not: the ``kubernetes`` client the tests use, pytest,
the trainer's torch. Some libraries import what they find: kopf imports the ``kubernetes`` client when it is
installed (about 46 MB of RSS), and the image has none. So the top-level modules of every distribution outside
the image's dependency closure (``modules_the_image_lacks``, computed by the benchmark) are made unimportable
before the operator starts, as they are in the image: its memory and CPU are measured as deployed.
"""

from __future__ import annotations

import sys
from typing import Final

IMAGE_VENV: Final = frozenset({"pip", "setuptools", "wheel"})
"""What ``python3 -m venv`` and the image's build put in its venv beside the pinned closure."""


def modules_the_image_lacks() -> list[str]:
    """Top-level modules installed here whose distributions the operator image does not install."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from finetune_devtools import images

    pins = images.pins(images.INSTALLS["operator"]).splitlines()
    in_image = {canonicalize_name(Requirement(line).name) for line in pins}
    return sorted(
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if not module.startswith(("finetune_", "_"))
        and not {canonicalize_name(d) for d in distributions} & (in_image | IMAGE_VENV)
    )


def hide(modules: list[str]) -> None:
    """``import module`` raises ImportError for each, as where it is not installed."""
    for module in modules:
        sys.modules[module] = None  # type: ignore[assignment]


def main() -> None:
    hide([m for m in sys.argv[1].split(",") if m])
    from finetune_operator.controller.cli import main as operator

    sys.exit(operator(sys.argv[2:]))


if __name__ == "__main__":
    main()
