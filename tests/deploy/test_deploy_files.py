"""The Dockerfile and compose.yaml, checked without a container engine.

Real validators: hadolint lints the Dockerfile, and check-jsonschema validates compose.yaml
against the Compose specification's JSON schema (`--builtin-schema vendor.compose-spec`). Both
come with the `dev` extra; a missing one fails these tests. Each validator is also shown a broken
file, so a validator that accepts everything cannot pass for one that works. Then the invariants
the walk-through depends on, which no schema says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway_breaker import Config
from tests.deploy.conftest import REPO_ROOT, tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE = REPO_ROOT / "compose.yaml"
FLEET_YAML = REPO_ROOT / "deploy" / "fleet.yaml"

GATEWAYS = {"gateway-1": 8001, "gateway-2": 8002}
GATEWAY_CMD = [
    *["uvicorn", "examples.gateway:app", "--host", "0.0.0.0", "--port", "8000"],
    *["--timeout-graceful-shutdown", "5"],
]
UPSTREAM_CMD = ["uvicorn", "examples.upstream:app", "--host", "0.0.0.0", "--port", "9001"]
GATEWAY_ENV = {
    "REDIS_URL": "redis://redis:6379/0",
    "CIRCUIT_BREAKER_ENABLED": "true",
    "GATEWAY_BREAKER_CONFIG": "/config/fleet.yaml",
    "LOG_LEVEL": "debug",
    "GATEWAY_BREAKER_ADMIN_TOKEN": "${GATEWAY_BREAKER_ADMIN_TOKEN:-}",
}
GATEWAY_SETTINGS = ("REDIS_URL", "GATEWAY_BREAKER_CONFIG", "CIRCUIT_BREAKER_ENABLED", "LOG_LEVEL")


def run(argv: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        keyword, _, rest = (current + stripped).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"the Dockerfile ends inside a continued instruction: {current!r}"
    return result


def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile() if key == keyword]


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    spec = services[name]
    assert isinstance(spec, dict)
    return spec


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, from either compose syntax."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def build_context(spec: dict[str, Any]) -> tuple[str, str]:
    build = spec.get("build")
    if isinstance(build, str):
        return build, "Dockerfile"
    assert isinstance(build, dict), f"no build section: {spec}"
    return build.get("context", "."), build.get("dockerfile", "Dockerfile")


def healthcheck_words(spec: dict[str, Any]) -> str:
    check = spec.get("healthcheck") or {}
    assert not check.get("disable"), "healthcheck disabled"
    test = check.get("test")
    assert test, f"no healthcheck test: {spec}"
    return " ".join(test) if isinstance(test, list) else str(test)


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateway settings from the developer's shell must not reach Config."""
    for name in list(os.environ):
        upper = name.upper()
        if upper in GATEWAY_SETTINGS or upper.startswith(("REDIS__", "CIRCUIT_BREAKER__")):
            monkeypatch.delenv(name)


# -- validators --------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    result = run([tool("hadolint"), "--no-color", "Dockerfile"])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD uvicorn app:app\n")
    result = run([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, f"check-jsonschema:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("condition: service_healthy", "condition: service_happy"), "service_happy"),
        (("read_only: true", "readonly: true"), "readonly"),
        (("    restart: unless-stopped\n", "    restart: unless-stopped\n    bogus: 1\n"), "bogus"),
    ],
)
def test_compose_validator_rejects_broken_variants(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    text = COMPOSE.read_text()
    old, new = change
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = check_compose(broken)
    assert result.returncode != 0, result.stdout
    assert complaint in result.stdout + result.stderr


# -- Dockerfile --------------------------------------------------------------------------------


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each build stage by name: (what it is FROM, its instructions after the FROM)."""
    result: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for key, rest in dockerfile():
        if key == "FROM":
            base, _, name = rest.partition(" AS ")
            assert name, f"every stage is named: FROM {rest}"
            current = []
            result[name.strip()] = (base.strip(), current)
        else:
            current.append((key, rest))
    return result


def stage_args(stage: str, keyword: str) -> list[str]:
    """`keyword`'s arguments in `stage` and the stages it is built FROM."""
    all_stages = stages()
    base, steps = all_stages[stage]
    inherited = stage_args(base, keyword) if base in all_stages else []
    own = [rest for key, rest in steps if key == keyword]
    if keyword in ("CMD", "HEALTHCHECK", "USER") and own:
        return own  # the last one of a stage replaces its base's
    return inherited + own


def test_dockerfile_stages_build_then_run_on_a_slim_python_with_a_pinned_minor() -> None:
    all_stages = stages()
    assert list(all_stages) == ["build", "runtime", "upstream", "gateway"], list(all_stages)
    for name in ("build", "runtime"):
        base = all_stages[name][0]
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", base), base
    assert all_stages["build"][0] == all_stages["runtime"][0]
    assert all_stages["upstream"][0] == all_stages["gateway"][0] == "runtime"


@pytest.mark.parametrize("stage", ["upstream", "gateway"])
def test_dockerfile_runs_as_a_non_root_user(stage: str) -> None:
    users = stage_args(stage, "USER")
    assert users, "no USER instruction: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user


def test_dockerfile_installs_exactly_the_lock_in_the_build_stage() -> None:
    all_stages = stages()
    steps = all_stages["build"][1]
    copies = [rest for key, rest in steps if key == "COPY"]
    assert any("pyproject.toml" in rest and "uv.lock" in rest for rest in copies)
    assert any(rest.split()[0].rstrip("/") == "gateway_breaker" for rest in copies)
    installs = [rest for key, rest in steps if key == "RUN" and "pip install" in rest]
    assert len(installs) == 1, installs
    # The lock's pins (with hashes) for the example extra, then the package without resolving.
    assert "uv export --frozen --extra example" in installs[0]
    assert "-r /tmp/requirements.txt" in installs[0]
    assert "--no-deps ." in installs[0]
    assert "--no-cache-dir" in installs[0]
    assert "--prefix=/install" in installs[0]
    # the uv that exports is pinned like everything else
    assert re.search(r"uv==\d+\.\d+\.\d+", installs[0])
    position = {rest: i for i, (key, rest) in enumerate(steps)}
    assert position[copies[0]] < position[installs[0]]
    # The images get the installed tree and the examples, never the sources' build leftovers.
    runtime = all_stages["runtime"][1]
    runtime_copies = [rest for key, rest in runtime if key == "COPY"]
    assert "--from=build /install /usr/local" in runtime_copies
    assert not any("gateway_breaker" in rest for rest in runtime_copies)
    assert not any(key == "RUN" and "pip" in rest for key, rest in runtime)


def test_the_example_extra_brings_the_fast_transport_and_server() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    example = " ".join(project["optional-dependencies"]["example"])
    for needed in ("aiohttp", "uvloop", "httptools", "uvicorn", "fastapi"):
        assert needed in example, needed


@pytest.mark.parametrize(("stage", "argv"), [("gateway", GATEWAY_CMD), ("upstream", UPSTREAM_CMD)])
def test_dockerfile_cmd_is_exec_form(stage: str, argv: list[str]) -> None:
    assert json.loads(stage_args(stage, "CMD")[-1]) == argv
    assert not args_of("ENTRYPOINT")


@pytest.mark.parametrize(
    ("stage", "url"),
    [("gateway", "http://127.0.0.1:8000/healthz"), ("upstream", "http://127.0.0.1:9001/_stats")],
)
def test_dockerfile_healthcheck_without_curl(stage: str, url: str) -> None:
    check = stage_args(stage, "HEALTHCHECK")[-1]
    options, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2]
    assert url in argv[2]
    assert "--timeout=" in options
    # The one-liner is valid Python.
    compile(argv[2], "<healthcheck>", "exec")


@pytest.mark.parametrize(
    ("stage", "ports"), [("gateway", ["8000", "9180"]), ("upstream", ["9001"])]
)
def test_each_image_exposes_the_ports_it_listens_on(stage: str, ports: list[str]) -> None:
    assert stage_args(stage, "EXPOSE") == ports
    argv = json.loads(stage_args(stage, "CMD")[-1])
    assert argv[argv.index("--port") + 1] == ports[0]


def test_the_gateway_image_serves_the_admin_surface_on_its_own_port() -> None:
    env = " ".join(stage_args("gateway", "ENV")).split()
    assert "GATEWAY_BREAKER_ADMIN_PORT=9180" in env
    assert "GATEWAY_BREAKER_ADMIN_HOST=0.0.0.0" in env


def test_the_default_target_is_the_gateway() -> None:
    assert list(stages())[-1] == "gateway"


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    entries = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache", "tests"):
        assert needed in entries, needed
    for kept in ("pyproject.toml", "README.md", "gateway_breaker", "examples"):
        assert kept not in entries, kept
    assert "*" not in entries
    assert not any(entry.startswith("!") for entry in entries), entries


# -- compose.yaml ------------------------------------------------------------------------------


def test_compose_has_no_obsolete_version_key() -> None:
    assert "version" not in compose()


def test_compose_services() -> None:
    assert set(compose()["services"]) == {"redis", "upstream", "prometheus", *GATEWAYS}


def test_redis_service_is_health_checked() -> None:
    redis = service("redis")
    assert redis["image"] == "redis:7-alpine"
    words = healthcheck_words(redis)
    assert "redis-cli" in words
    assert "ping" in words


@pytest.mark.parametrize(("name", "host_port"), GATEWAYS.items())
def test_gateway_service(name: str, host_port: int) -> None:
    gateway = service(name)
    assert build_context(gateway) == (".", "Dockerfile")
    assert environment(gateway) == GATEWAY_ENV
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert f"{host_port}:8000" in [str(port) for port in gateway["ports"]]
    # The admin listener is published on the host's loopback only.
    (admin,) = [str(p) for p in gateway["ports"] if str(p).endswith(":9180")]
    assert admin.startswith("127.0.0.1:")
    # No command of its own: the image's CMD (the gateway) and HEALTHCHECK (/healthz) apply.
    assert "command" not in gateway
    assert not (gateway.get("healthcheck") or {}).get("disable")
    mounts = [m for m in gateway["volumes"] if isinstance(m, dict)]
    config = [m for m in mounts if m["target"] == GATEWAY_ENV["GATEWAY_BREAKER_CONFIG"]]
    assert len(config) == 1, gateway["volumes"]
    assert config[0]["type"] == "bind"
    assert config[0]["read_only"] is True
    assert (REPO_ROOT / config[0]["source"]).resolve() == FLEET_YAML


def target_of(spec: dict[str, Any]) -> str:
    build = spec["build"]
    assert isinstance(build, dict), build
    return str(build.get("target") or list(stages())[-1])


def test_upstream_service_runs_the_demo_stage_of_the_same_dockerfile() -> None:
    upstream = service("upstream")
    gateway = service("gateway-1")
    assert build_context(upstream) == build_context(gateway) == (".", "Dockerfile")
    assert target_of(upstream) == "upstream"
    assert target_of(gateway) == "gateway"
    assert upstream["image"] != gateway["image"]
    # The image's CMD and HEALTHCHECK apply.
    assert "command" not in upstream
    assert "healthcheck" not in upstream


def test_compose_publishes_only_ports_its_images_listen_on() -> None:
    for name, spec in compose()["services"].items():
        if "build" not in spec:
            continue
        exposed = set(stage_args(target_of(spec), "EXPOSE"))
        published = {str(p).rsplit(":", 1)[-1] for p in spec.get("ports", [])}
        assert published <= exposed, f"{name} publishes {published}, its image listens on {exposed}"
        assert "expose" not in spec, name


def test_compose_references_resolve() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        for dependency in spec.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in spec.get("volumes") or []:
            if isinstance(mount, dict) and mount.get("type") == "bind":
                assert (REPO_ROOT / mount["source"]).exists(), mount
    published = [str(p).split(":")[-2] for spec in services.values() for p in spec.get("ports", [])]
    assert len(published) == len(set(published)), published


# -- deploy/fleet.yaml and deploy/fleet.py -----------------------------------------------------


@pytest.mark.usefixtures("isolated_env")
def test_fleet_config_is_valid_and_points_at_the_upstream_service() -> None:
    config = Config.from_yaml(FLEET_YAML)
    services = config.circuit_breaker.services
    assert set(services) == {"discovery", "sona", "auth"}
    for name, policy in services.items():
        assert policy.upstream == f"http://upstream:9001/{name}"
        assert policy.prefix == f"/{name}"
    assert services["discovery"].failure_threshold == 3
    assert services["discovery"].timeout_seconds == 10
    assert config.redis.key_prefix == "circuit_breaker"


@pytest.mark.usefixtures("isolated_env")
def test_process_fleet_rewrites_only_the_upstream_host(fleet: ModuleType, tmp_path: Path) -> None:
    doc = fleet.local_config(FLEET_YAML, "http://127.0.0.1:19001")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    local = Config.from_yaml(path)
    original = Config.from_yaml(FLEET_YAML)
    for name, policy in local.circuit_breaker.services.items():
        assert policy.upstream == f"http://127.0.0.1:19001/{name}"
        before = original.circuit_breaker.services[name]
        assert policy.model_dump(exclude={"upstream"}) == before.model_dump(exclude={"upstream"})


def test_process_fleet_runs_what_compose_runs(fleet: ModuleType) -> None:
    """deploy/fleet.py starts the same commands with the same environment as compose.yaml."""
    env = fleet.gateway_env("redis://redis:6379/0", "/config/fleet.yaml")
    for name in GATEWAYS:
        # Not the admin token compose passes through: processes on one host have one admin port.
        compose_env = environment(service(name))
        assert compose_env.pop("GATEWAY_BREAKER_ADMIN_TOKEN") == "${GATEWAY_BREAKER_ADMIN_TOKEN:-}"
        assert env == compose_env
    assert fleet.uvicorn_command(fleet.GATEWAY_APP, "0.0.0.0", 8000)[2:] == GATEWAY_CMD
    assert fleet.uvicorn_command(fleet.UPSTREAM_APP, "0.0.0.0", 9001)[2:] == UPSTREAM_CMD
    defaults = fleet.parse_args([])
    assert defaults.gateway_ports == list(GATEWAYS.values())
    assert defaults.upstream_port == 9001
    assert defaults.redis_port == 6390
    argv = fleet.redis_command("redis-server", 6390, Path("/tmp/x"))
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--bind") + 1] == "127.0.0.1"
