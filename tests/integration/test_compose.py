"""docker-compose.yml checked statically (no Docker engine here): it parses, every image/build and
mounted file exists, every variable it interpolates is in .env.example, volumes and depends_on are
consistent, host ports are unique, and the Airflow services agree on executor, DB and secrets.
`docker compose config` runs too when a compose client is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR — but not $$ (a literal $ for the container).
VARIABLE = re.compile(
    r"(?<!\$)\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
AIRFLOW_SERVICES = [
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"
]


def read_env_example() -> dict[str, str]:
    values = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f"{ENV_EXAMPLE}:{number}: not KEY=VALUE"
        key, value = line.split("=", 1)
        values[key] = value.strip('"')
    return values


def interpolate(value, env: dict[str, str]):
    """Like compose: substitute inside every parsed string value (keys and structure are not touched)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: env[m.group("braced") or m.group("bare")], value).replace("$$", "$")
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), read_env_example())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_every_interpolated_variable_is_in_env_example():
    referenced = {m.group("braced") or m.group("bare") for m in VARIABLE.finditer(COMPOSE_FILE.read_text())}
    missing = referenced - set(read_env_example())
    assert not missing, f"{COMPOSE_FILE.name} uses variables not in {ENV_EXAMPLE.name}: {sorted(missing)}"


def test_the_stack_has_every_component(services):
    expected = {
        "postgres", "redis", "minio", "minio-init", "mlflow", "serving", *AIRFLOW_SERVICES,
    }
    assert expected <= set(services), sorted(expected - set(services))


def test_images_and_build_contexts_exist(services):
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if build := service.get("build"):
            context = REPO / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            # Every COPY source of the Dockerfile exists in its context.
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from" not in line:
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{dockerfile}: COPY source {source} missing"
        if "image" in service and "build" not in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), (
                f"{name}: pin the image tag ({service['image']})"
            )


def test_volumes_are_declared_and_bind_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                if source.endswith(".sh"):
                    assert (REPO / source).is_file(), f"{name}: bind-mounted file {source} missing"
                continue
            assert source in declared, f"{name}: volume {source} is not declared at the top level"
            used.add(source)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_depends_on_targets_exist_and_conditions_make_sense(services):
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}: it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot: restart: no"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"


def test_long_running_services_have_healthchecks(services):
    one_shot = {name for name, s in services.items() if s.get("restart", "no") == "no"}
    for name in set(services) - one_shot:
        assert "healthcheck" in services[name], f"{name}: no healthcheck"


def test_host_ports_do_not_clash(services):
    seen: dict[str, str] = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            assert host not in seen, f"host port {host} used by {seen.get(host)} and {name}"
            seen[host] = name
    assert len(seen) >= 5  # Airflow UI, MLflow, MinIO API + console, the service


def test_airflow_services_share_executor_database_and_secrets(services):
    environments = [services[name]["environment"] for name in AIRFLOW_SERVICES]
    keys = [
        "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "NL2SQL_WORKSPACE",
    ]
    for key in keys:
        assert len({env[key] for env in environments}) == 1, f"{key} differs between Airflow services"
    env = environments[0]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["NL2SQL_SERVICE_URL"].startswith("http://serving:")
    # The service checks the same admin token the DAG sends.
    assert services["serving"]["environment"]["NL2SQL_ADMIN_TOKEN"] == env["NL2SQL_ADMIN_TOKEN"]
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "postgres:5432/mlflow" in mlflow_command and "--artifacts-destination=s3://" in mlflow_command


def compose_client() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run(
            [*command, "version"], capture_output=True
        ).returncode == 0:
            return command
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client installed (validated statically above)")
    result = subprocess.run(
        [*client, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
