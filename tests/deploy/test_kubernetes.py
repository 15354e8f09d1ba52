"""deploy/kubernetes/, checked without a cluster.

kubernetes-validate (the `dev` extra) validates every manifest against the Kubernetes API's own
JSON schemas, which ship inside its wheel, so no network is needed; `--strict` rejects unknown
fields. It is also shown a broken manifest, so a validator that accepts everything cannot pass.
Then what the manifests must agree on with the image and the gateway, which no schema says.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_breaker import Config
from tests.deploy.conftest import REPO_ROOT, tool
from tests.deploy.test_deploy_files import stage_args

KUBE_DIR = REPO_ROOT / "deploy" / "kubernetes"
KUBE_VERSION = "1.30.0"  # the oldest minor still in support upstream when this was written


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    argv = [tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSION, *map(str, paths)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in spec.get("env", [])}


def test_every_manifest_passes_strict_schema_validation_offline() -> None:
    paths = sorted(KUBE_DIR.glob("*.yaml"))
    assert {p.name for p in paths} == {"gateway.yaml", "redis.yaml", "upstream.yaml"}
    done = validate(*paths)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ("spec:\n  replicas: three\n", "a string where an integer belongs"),
        ("spec:\n  replicaz: 3\n", "an unknown field (strict)"),
    ],
)
def test_the_validator_rejects_broken_manifests(tmp_path: Path, broken: str, why: str) -> None:
    head = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n"
    template = (
        "  selector: {matchLabels: {a: b}}\n"
        "  template:\n    metadata: {labels: {a: b}}\n"
        "    spec: {containers: [{name: c, image: i}]}\n"
    )
    path = tmp_path / "broken.yaml"
    path.write_text(head + broken + template)
    assert validate(path).returncode != 0, why


def test_the_gateway_runs_three_replicas_of_the_image_on_its_port() -> None:
    deployment = find("Deployment", "gateway-breaker")
    assert deployment["spec"]["replicas"] == 3
    gateway = container(deployment)
    assert gateway["image"] == "gateway-breaker:local"
    ports = [str(port["containerPort"]) for port in gateway["ports"]]
    assert ports == stage_args("gateway", "EXPOSE")
    env = {item["name"]: item.get("value") for item in gateway["env"]}
    # The admin surface on its own port, on the pod's loopback (kubectl port-forward reaches it).
    assert env["GATEWAY_BREAKER_ADMIN_PORT"] == "9180"
    assert env["GATEWAY_BREAKER_ADMIN_HOST"] == "127.0.0.1"
    services = [m for m in manifests() if m["kind"] == "Service"]
    assert all(p.get("targetPort") != "admin" for s in services for p in s["spec"]["ports"])
    # The image's CMD: no command or args of its own.
    assert "command" not in gateway
    assert "args" not in gateway


def test_readiness_and_liveness_ask_healthz() -> None:
    gateway = container(find("Deployment", "gateway-breaker"))
    port_names = {p["name"] for p in gateway["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        check = gateway[probe]["httpGet"]
        assert check["path"] == "/healthz", probe
        assert check["port"] in port_names, probe


def test_the_admin_token_comes_from_a_secret_that_is_not_in_the_repository() -> None:
    env = env_of(container(find("Deployment", "gateway-breaker")))
    token = env["GATEWAY_BREAKER_ADMIN_TOKEN"]
    assert "value" not in token
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "gateway-breaker-admin", "key": "token"}
    assert not [d for d in manifests() if d["kind"] == "Secret"], "no token may be committed"
    assert (
        "kubectl create secret generic gateway-breaker-admin"
        in (KUBE_DIR / "gateway.yaml").read_text()
    )


def test_pods_run_as_the_images_unprivileged_user_with_a_read_only_root() -> None:
    (image_user,) = {u.split(":")[0] for u in stage_args("gateway", "USER")}
    for name in ("gateway-breaker", "upstream"):
        pod = find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == image_user
        security = container(find("Deployment", name))["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]


def test_the_config_is_valid_and_points_at_the_services_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "GATEWAY_BREAKER_CONFIG", "CIRCUIT_BREAKER_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    config_map = find("ConfigMap", "gateway-breaker-config")
    env = env_of(container(find("Deployment", "gateway-breaker")))
    mount = container(find("Deployment", "gateway-breaker"))["volumeMounts"][0]
    filename = env["GATEWAY_BREAKER_CONFIG"]["value"].removeprefix(mount["mountPath"] + "/")
    path = tmp_path / filename
    path.write_text(config_map["data"][filename])
    config = Config.from_yaml(path)
    upstream_port = find("Service", "upstream")["spec"]["ports"][0]["port"]
    for name, service in config.circuit_breaker.services.items():
        assert service.upstream == f"http://upstream:{upstream_port}/{name}"
    redis_port = find("Service", "redis")["spec"]["ports"][0]["port"]
    assert env["REDIS_URL"]["value"] == f"redis://redis:{redis_port}/0"


def test_services_select_their_deployments_pods_by_named_ports() -> None:
    for name in ("gateway-breaker", "redis", "upstream"):
        service = find("Service", name)
        deployment = find("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
