"""The deployment files: docker-compose.temporal.yml and the worker's Dockerfile.

No Docker engine runs here, so these tests check what a broken deployment would get wrong first: images pinned,
every dependency waited on through a healthcheck or a one-shot's success, the schema set up before the server
starts, the scripts and config the services mount present and valid, and the worker given exactly the
privileges bubblewrap needs (never `privileged`, never an added capability).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.temporal.yml"
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE.read_text())
    return compose["services"]


def image_tag(image: str) -> str:
    """The tag an image reference resolves to, with `${VAR:-default}` taken at its default."""
    resolved = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", image)
    assert "$" not in resolved, f"{image}: a variable without a default leaves the image unpinned"
    name, _, tag = resolved.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    return tag


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "image" in service and "build" not in service:
            tag = image_tag(service["image"])
            assert tag != "latest" and re.match(r"^\d", tag), f"{name}: pin {service['image']} to a version"
    assert "auto-setup" not in COMPOSE.read_text(), "temporalio/auto-setup is deprecated: use server + admin-tools"


def test_every_dependency_is_waited_for_by_a_healthcheck_or_a_finished_one_shot(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on as a list only waits for a container to start"
        for target, rule in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
            elif condition == "service_completed_successfully":
                one_shot = services[target]
                assert "command" in one_shot and "ports" not in one_shot, f"{target} is not a one-shot"
                assert str(one_shot.get("restart", "no")).startswith(("no", "on-failure")), target
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} does not wait for readiness")


def test_the_schema_is_set_up_before_the_server_and_the_namespace_before_the_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    def waits_for(name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(services[name].get("depends_on", {}))
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo += list(services[dep].get("depends_on", {}))
        assert name not in seen, f"{name} depends on itself"
        return seen

    setup = services["temporal-admin-tools"]
    assert "admin-tools" in setup["image"] and setup["command"] == ["/deploy/setup-postgres.sh"]
    assert "temporal-admin-tools" in waits_for("temporal")
    assert {"temporal", "temporal-create-namespace"} <= waits_for("tardigrade-worker")
    assert {"temporal", "temporal-create-namespace"} <= waits_for("temporal-ui")


def test_mounted_scripts_and_config_exist_and_parse(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
        command = service.get("command")
        if isinstance(command, list) and command[0].startswith("/deploy/"):
            script = REPO / "deploy" / command[0].removeprefix("/deploy/")
            assert script.is_file(), f"{name} runs {command[0]}, missing"
            subprocess.run(["sh", "-n", str(script)], check=True)  # syntax
    config = services["temporal"]["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    dynamic = REPO / "deploy" / "dynamicconfig" / Path(config).name
    assert isinstance(yaml.safe_load(dynamic.read_text()), dict), f"{dynamic} is not a YAML mapping"


def test_the_worker_gets_what_bubblewrap_needs_and_nothing_more(services: dict[str, dict[str, Any]]) -> None:
    worker = services["tardigrade-worker"]
    assert set(worker["security_opt"]) == {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}
    assert not worker.get("privileged") and not worker.get("cap_add"), "bubblewrap needs no capability"
    assert worker["devices"] == ["/dev/net/tun"], "only slirp4netns's TUN device, for `network: true` sandboxes"
    env = worker["environment"]
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    code = "\n".join(p.read_text() for p in (REPO / "tardigrade").rglob("*.py"))
    for variable in env:
        if variable.startswith("TARDIGRADE_"):
            assert variable in code, f"the worker is given {variable}, which no code reads"
    assert worker["build"] == "." and DOCKERFILE.is_file()


def test_the_dockerfile_installs_bubblewrap_and_runs_the_worker_unprivileged() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("FROM ")).split()[1]
    assert image_tag(base) != "latest"
    text = "\n".join(lines)
    assert "bubblewrap" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"
    assert lines[-1] == 'CMD ["tardigrade", "worker"]'
    extras = re.search(r'pip install [^"]*"\.\[([a-z0-9,]+)\]"', text)
    assert extras, "the image installs the project with its extras"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(declared), "the Dockerfile names an extra pyproject lacks"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "node_modules" in ignored, "the build context would ship the venv"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) if present, else Debian's `docker-compose`, which scripts/test.sh installs."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_validates_the_file_against_its_schema(tmp_path: Path) -> None:
    command = compose_command()
    assert command is not None
    ok = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    # The validator is a real one: a misspelt condition is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("service_healthy", "service_healty"))
    bad = subprocess.run([*command, "-f", str(broken), "config", "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "service_healty" in bad.stderr
