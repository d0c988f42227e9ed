"""``make images``: the operator and trainer images from the one Dockerfile, built with podman.

Offline-first, like the rest of the project:
- the base is ``python:3.11-slim`` when it is in the local store or a registry answers, otherwise
  a Debian bookworm root with Python 3.11 built by mmdebstrap (``podman import``-ed once);
- Python packages come from a directory of wheels collected on the host with pip (its cache
  makes that cheap) and mounted into the build (``PIP_NO_INDEX``/``PIP_FIND_LINKS``);
- each image is tagged with a hash of its inputs (Dockerfile stages, sources, the pins of what it
  installs, base), so a second run with nothing changed only checks that the tags exist.

podman runs with the project's ``dev/containers.conf`` (runc, cgroupfs, no default ulimits).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from finetune_localcluster.build import BuildError, cache_root
from finetune_localcluster.containers import podman_env

REPO = Path(__file__).resolve().parents[4]
USER_BASE = "docker.io/library/python:3.11-slim"
OFFLINE_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
OFFLINE_BASE = (
    "localhost/finetune-base:bookworm-" + hashlib.sha256(" ".join(OFFLINE_BASE_PACKAGES).encode()).hexdigest()[:12]
)
INPUTS = {
    "operator": ("trainer/pyproject.toml", "trainer/src", "operator/pyproject.toml", "operator/src"),
    "trainer-deps": ("trainer/pyproject.toml",),
    "trainer": ("trainer/pyproject.toml", "trainer/src"),
}
"""What each image is built from besides its Dockerfile stages and pins: a change in any of these makes a new tag."""
INSTALLS = {"operator": ("trainer", "operator"), "trainer-deps": ("trainer[train,qlora]",), "trainer": ()}
"""The project packages (directory[extras]) whose dependencies each image pip-installs from the wheelhouse. Only
the constraints.txt pins of their dependency closure key the image and fill its wheelhouse: a pin for a dev
tool (optuna-dashboard, a linter) must not rebuild the 6.6 GB trainer-deps layer."""
STAGES = {"operator": ("base", "operator"), "trainer-deps": ("base", "trainer-deps"), "trainer": ("trainer",)}
"""The Dockerfile stages each image is built from (the base image itself is hashed by its id)."""
PARENT = {"trainer": "trainer-deps"}
"""An image built on another of ours (its stage replaced with ``--build-context``) instead of the
base: the heavy dependency layer is rebuilt only when its own inputs change, the thin trainer
layer in seconds."""


@dataclass(frozen=True)
class Image:
    """A built image: ``localhost/finetune-<target>:<content hash>``."""

    target: str
    ref: str
    size_bytes: int
    built: bool
    seconds: float


def podman() -> str:
    """The podman binary, or a one-line error saying how to get it."""
    found = shutil.which("podman")
    if not found:
        raise BuildError(
            "podman is not installed: run `dev/install-system-deps.sh containers` (apt: podman buildah runc mmdebstrap)"
        )
    return found


def _run(*args: str, what: str, capture: bool = False) -> str:
    proc = subprocess.run(args, env=podman_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout.strip() if capture else ""


def _exists(ref: str) -> bool:
    return subprocess.run([podman(), "image", "exists", ref], env=podman_env(), check=False).returncode == 0


def _image_id(ref: str) -> str:
    return _run(podman(), "image", "inspect", "--format", "{{.Id}}", ref, what=f"inspecting {ref}", capture=True)


def _size(ref: str) -> int:
    return int(_run(podman(), "image", "inspect", "--format", "{{.Size}}", ref, what=f"inspecting {ref}", capture=True))


def _say(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def base_image() -> str:
    """``python:3.11-slim`` if present or pullable; else the mmdebstrap base (built once).

    An offline base built earlier is reused without asking a registry again, so warm runs
    never wait on a pull timeout.
    """
    for ref in (USER_BASE, OFFLINE_BASE):
        if _exists(ref):
            return ref
    try:
        pull = subprocess.run(
            [podman(), "pull", "--quiet", USER_BASE], env=podman_env(), capture_output=True, timeout=60, check=False
        )
        if pull.returncode == 0:
            return USER_BASE
    except subprocess.TimeoutExpired:
        pass
    if not shutil.which("mmdebstrap"):
        raise BuildError(
            f"no registry answers for {USER_BASE} and mmdebstrap is missing: "
            "run `dev/install-system-deps.sh containers`"
        )
    _say(f"no registry reachable: building {OFFLINE_BASE} with mmdebstrap (Debian bookworm, ~30 s)")
    work = cache_root().parent / "images"
    work.mkdir(parents=True, exist_ok=True)
    rootfs = work / f"rootfs-{os.getpid()}.tar"
    try:
        _run(
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(OFFLINE_BASE_PACKAGES)}",
            "--aptopt=APT::Install-Recommends false",
            "--customize-hook=rm -rf $1/var/cache/apt/* $1/var/lib/apt/lists/*",
            "bookworm",
            str(rootfs),
            what="mmdebstrap (the offline Debian base)",
        )
        _run(podman(), "import", "--change", 'CMD ["python3"]', str(rootfs), OFFLINE_BASE, what="podman import")
    finally:
        rootfs.unlink(missing_ok=True)
    return OFFLINE_BASE


def _closure(requirements: list[Requirement]) -> set[str] | None:
    """Canonical names of the distributions installing ``requirements`` pulls in, read from the metadata of
    the venv this runs in (installed from the same constraints.txt, on the same Python); None if one is
    missing there (then every pin counts)."""
    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            return None
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(dep)
    return names


def pins(projects: tuple[str, ...]) -> str:
    """The constraints.txt lines that installing ``projects`` (``trainer[train,qlora]``...) uses, sorted."""
    lines = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    pinned: dict[str, str] = {
        canonicalize_name(Requirement(line).name): line for line in lines if line and not line.startswith("#")
    }
    closure = _closure([Requirement(f"finetune-{project}") for project in projects]) if projects else set()
    used = sorted(pinned.values()) if closure is None else sorted(pinned[n] for n in closure if n in pinned)
    return "\n".join(used)


def wheelhouse(target: str) -> Path:
    """The third-party wheels ``target`` installs (and the build backend), collected once per set of pins.

    pip's own cache makes this cheap after ``make venv``; the build then needs no network.
    """
    projects = INSTALLS[target]
    key = hashlib.sha256(f"{projects}\n{pins(projects)}".encode()).hexdigest()[:16]
    final = cache_root().parent / "images" / f"wheels-{key}"
    if (final / ".complete").exists():
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _say(f"collecting wheels into {final} (pip's cache keeps this cheap)")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="finetune-wheel-src-") as src:
        # pip builds local projects in their tree (build/): build copies, never the checkout.
        for project in ("trainer", "operator"):
            shutil.copytree(REPO / project, Path(src) / project, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        wheel = [*pip, "wheel", "--quiet", "-c", "constraints.txt", "-w", str(tmp), *(f"{src}/{p}" for p in projects)]
        for cmd, what in (
            *([(wheel, "pip wheel")] if projects else []),
            ([*pip, "download", "--quiet", "-d", str(tmp), "setuptools>=68", "wheel"], "pip download (build backend)"),
        ):
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise BuildError(f"{what} failed collecting the images' Python packages: {last}")
    for ours in tmp.glob("finetune_*.whl"):
        ours.unlink()  # built from the sources inside the image, so the tag hash covers them
    (tmp / ".complete").touch()
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def _ignored(path: Path) -> bool:
    """Build leftovers that .dockerignore keeps out of the image, so out of the hash too."""
    return any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def dockerfile_stages(text: str) -> dict[str, str]:
    """The Dockerfile's stages by name (``""``: the ARGs before the first FROM), comments dropped."""
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0].upper() == "FROM" and words[-2].upper() == "AS":
            current = words[-1]
            stages[current] = []
        if words and not words[0].startswith("#"):
            stages[current].append(line)
    return {name: "\n".join(lines) for name, lines in stages.items()}


def content_tag(target: str, base_id: str) -> str:
    """A hash of everything ``target`` is built from (its Dockerfile stages, its inputs, the image it
    starts from): the same inputs always give the same tag."""
    h = hashlib.sha256(f"{target}\n{base_id}\n".encode())
    stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    for stage in STAGES[target]:
        h.update(stages[stage].encode() + b"\0")
    h.update(pins(INSTALLS[target]).encode() + b"\0")
    for name in INPUTS[target]:
        path = REPO / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p)) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _build_order(targets: tuple[str, ...]) -> list[str]:
    """Each target after the image it is built on (``trainer`` needs ``trainer-deps``)."""
    order: list[str] = []
    for target in targets:
        for needed in (PARENT.get(target), target):
            if needed and needed not in order:
                order.append(needed)
    return order


def build_images(targets: tuple[str, ...] = ("operator", "trainer")) -> list[Image]:
    """Build (or find) each target's image; a second run with nothing changed takes seconds."""
    podman()
    base = base_image()
    base_id = _image_id(base)
    images: list[Image] = []
    built: dict[str, str] = {}
    for target in _build_order(targets):
        start = time.monotonic()
        parent = PARENT.get(target)
        parent_ref = built[parent] if parent else base
        ref = f"localhost/finetune-{target}:{content_tag(target, _image_id(parent_ref) if parent else base_id)}"
        built[target] = ref
        fresh = not _exists(ref)
        if fresh:
            wheels = wheelhouse(target)
            _say(f"building {ref} from {parent_ref}")
            _run(
                podman(),
                "build",
                "--quiet",
                "--network=none",
                "--pull=never",
                # One layer per stage, no layer cache: buildah's cache keys a RUN by its text, not by
                # what its bind mount holds (a cached layer would install the sources of an earlier
                # build under the new tag), and no intermediate stage is left behind as a dangling image.
                "--layers=false",
                f"--target={target}",
                f"--build-arg=BASE={base}",
                *([f"--build-context={parent}=container-image://{parent_ref}"] if parent else []),
                "--build-arg=PIP_NO_INDEX=1",
                "--build-arg=PIP_FIND_LINKS=/wheels",
                f"--volume={wheels}:/wheels:ro",
                f"--tag={ref}",
                f"--tag=localhost/finetune-{target}:latest",
                "--file",
                str(REPO / "Dockerfile"),
                str(REPO),
                what=f"podman build --target {target}",
            )
            _forget_older(target, ref)
        else:
            _run(podman(), "tag", ref, f"localhost/finetune-{target}:latest", what="podman tag")
        images.append(Image(target, ref, _size(ref), fresh, time.monotonic() - start))
    return images


def _forget_older(target: str, ref: str) -> None:
    """Untag (and so free) the earlier builds of ``target``: every source change makes a new tag."""
    listed = _run(
        podman(), "images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/finetune-{target}",
        what="podman images", capture=True,
    )  # fmt: skip
    older = [r for r in listed.split() if r not in (ref, f"localhost/finetune-{target}:latest")]
    if older:
        subprocess.run([podman(), "rmi", "--ignore", *older], env=podman_env(), capture_output=True, check=False)


def main(targets: tuple[str, ...] = ("operator", "trainer")) -> None:
    """Build the images and print each one's reference and size."""
    start = time.monotonic()
    try:
        images = build_images(targets)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for image in images:
        how = f"built in {image.seconds:.0f} s" if image.built else "up to date"
        print(f"{image.ref}  {image.size_bytes / 1e6:,.0f} MB  ({how})")
    print(f"images ready in {time.monotonic() - start:.1f} s", flush=True)
