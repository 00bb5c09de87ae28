"""The deployment files, checked without Docker or Kubernetes: they parse and agree with the code.

Ports, paths, `BRIDGE_*` names and values (parsed by the bridge's own settings), the drain time against the
grace periods, and every metric the alerts and the dashboard use against what a running bridge exports.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bridge.ingest.server import create_app
from bridge.kafka.topics import intended_topic
from bridge.settings import COMMANDS, ServeSettings, SettingsError, build, require_authentication
from tests.support.fakes import FakePublisher

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OPTION_ENVS = {command.env(option) for command in COMMANDS.values() for option in command.options}
# Names the deployment files set ahead of the code that reads them, with the issue that adds it.
PLANNED_ENVS: dict[str, str] = {}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


COMPOSE: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
MANIFESTS: dict[str, dict[str, Any]] = {
    document["kind"]: document
    for path in sorted(KUBERNETES.glob("*.yaml"))
    if path.name != "kustomization.yaml"
    for document in yaml.safe_load_all(path.read_text())
}
CONFIG = MANIFESTS["ConfigMap"]["data"]
DEPLOYMENT = MANIFESTS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


def env_of(service: str) -> dict[str, str]:
    """A service's environment as compose sets it from an empty shell: `${NAME:-default}` is the default."""
    return {
        name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
        for name, value in SERVICES[service].get("environment", {}).items()
    }


def drain_seconds(settings: ServeSettings) -> float:
    """The longest a bridge takes to stop (README, Guarantees): delay, drain, flush, and two seconds."""
    return (
        settings.shutdown_delay
        + settings.body_timeout
        + settings.delivery_timeout
        + settings.shutdown_timeout
        + 2
    )


# --- Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), continuation lines joined, by stage."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_image_is_built_in_stages_on_slim_python_and_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?( AS \w+)?", stage[0][1]), stage[0][1]
    final = stages[-1]
    users = [arguments for instruction, arguments in final if instruction == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert not any(instruction == "ARG" for instruction, _ in final)


def test_the_final_image_installs_no_build_tools() -> None:
    final_runs = " ".join(
        arguments for instruction, arguments in dockerfile_stages()[-1] if instruction == "RUN"
    )
    for tool in ("apt-get install", "gcc", "build-essential", "pip install", "apk add"):
        assert tool not in final_runs


def test_the_image_checks_healthz_without_curl_and_serves_by_default() -> None:
    final = dict(dockerfile_stages()[-1])
    assert "/healthz" in final["HEALTHCHECK"]
    assert "curl" not in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["bridge", "serve"]
    assert "CMD" not in final, "configuration goes through BRIDGE_* variables, not arguments"


def test_the_images_environment_holds_only_settings_the_bridge_reads_and_exposes_its_port() -> None:
    final = dockerfile_stages()[-1]
    env = dict(
        pair.split("=", 1) for args in (a for i, a in final if i == "ENV") for pair in shlex.split(args)
    )
    bridge_env = {name: value for name, value in env.items() if name.startswith("BRIDGE_")}
    assert set(bridge_env) <= OPTION_ENVS
    settings = build("serve", {}, bridge_env)
    assert [args for instruction, args in final if instruction == "EXPOSE"] == [str(settings.port)]


def test_the_image_copies_only_what_exists_and_leaves_the_virtualenv_out() -> None:
    for instruction, arguments in dockerfile_stages()[0]:
        if instruction == "COPY":
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


# --- docker-compose.yml -------------------------------------------------------------------------------


def test_compose_runs_a_pinned_apache_kafka_in_kraft_mode() -> None:
    kafkas = [
        name for name, service in SERVICES.items() if service.get("image", "").startswith("apache/kafka")
    ]
    assert kafkas
    for name in kafkas:
        assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", SERVICES[name]["image"])
        assert "KAFKA_PROCESS_ROLES" in env_of(name)
        assert not any("ZOOKEEPER" in variable for variable in env_of(name))
    assert "controller" in env_of("kafka")["KAFKA_PROCESS_ROLES"]


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if service.get("restart") != "no":
            assert "test" in service.get("healthcheck", {}), name


def test_the_topics_service_runs_ensure_and_the_bridge_waits_for_it_and_a_healthy_broker() -> None:
    assert SERVICES["topics"]["entrypoint"] == ["bridge", "topics", "ensure"]
    depends = SERVICES["bridge"]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert SERVICES["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("bridge", "topics"):
        assert (ROOT / SERVICES[name]["build"]["context"] / SERVICES[name]["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize(("service", "command"), [("bridge", "serve"), ("topics", "topics")])
def test_compose_sets_only_bridge_settings_with_values_the_bridge_accepts(service: str, command: str) -> None:
    env = env_of(service)
    assert set(env) <= OPTION_ENVS | set(PLANNED_ENVS)
    settings = build(command, {}, env)
    for server in settings.bootstrap_servers:
        host, port = server.rsplit(":", 1)
        assert f"PLAINTEXT://:{port}" in env_of(host)["KAFKA_LISTENERS"], server
        assert f"PLAINTEXT://{host}:{port}" in env_of(host)["KAFKA_ADVERTISED_LISTENERS"], server


def test_the_bridge_port_its_healthcheck_and_the_prometheus_target_agree() -> None:
    """The healthcheck asks the callback port's /healthz; Prometheus scrapes the admin port, which compose
    publishes on loopback beside the callback port."""
    settings = build("serve", {}, env_of("bridge"))
    bridge = SERVICES["bridge"]
    assert settings.admin_port is not None
    assert settings.admin_port != settings.port
    assert settings.admin_host is None  # the same address as the callbacks', inside the container
    assert f"127.0.0.1:{settings.port}:{settings.port}" in bridge["ports"]
    assert f"127.0.0.1:{settings.admin_port}:{settings.admin_port}" in bridge["ports"]
    assert f"127.0.0.1:{settings.port}/healthz" in " ".join(bridge["healthcheck"]["test"])
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"bridge:{settings.admin_port}"]


def test_the_bridge_is_given_longer_to_stop_than_it_takes_to_drain() -> None:
    settings = build("serve", {}, env_of("bridge"))
    grace = SERVICES["bridge"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > drain_seconds(settings)


def test_the_cluster_profile_has_three_brokers_so_topics_get_three_replicas_two_in_sync() -> None:
    brokers = [
        name for name, service in SERVICES.items() if "KAFKA_NODE_ID" in service.get("environment", {})
    ]
    cluster = [name for name in brokers if "cluster" in SERVICES[name].get("profiles", ["cluster"])]
    assert len(cluster) == 3
    assert len({env_of(name)["KAFKA_NODE_ID"] for name in cluster}) == 3
    intended = intended_topic(build("topics", {}, env_of("topics")), len(cluster))
    assert (intended.replication_factor, intended.configs["min.insync.replicas"]) == (3, "2")
    for name in cluster:
        if name != "kafka":
            assert SERVICES["topics"]["depends_on"][name] == {
                "condition": "service_healthy",
                "required": False,
            }


def test_the_monitoring_profile_mounts_files_that_exist_where_their_configs_look() -> None:
    mounts = {
        target: ROOT / source
        for name in ("prometheus", "grafana")
        for source, target, *_ in (volume.split(":") for volume in SERVICES[name]["volumes"])
    }
    for target, source in mounts.items():
        assert source.exists(), target
    prometheus = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    assert all(rule_file in mounts for rule_file in prometheus["rule_files"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    provider = load_yaml(mounts["/etc/grafana/provisioning"] / "dashboards" / "bridge.yml")
    dashboards = mounts[provider["providers"][0]["options"]["path"]]
    assert (dashboards / "bridge.json").is_file()
    (source,) = load_yaml(mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in SERVICES["prometheus"]["ports"]
    uids = {panel["datasource"]["uid"] for panel in dashboard()["panels"]}
    assert uids == {source["uid"]}


# --- Kubernetes ---------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(KUBERNETES / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    kinds = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret"}
    assert set(MANIFESTS) >= kinds | {"Job"}


FILLED_SECRET = {"callback-token": "1400000001=a-real-token\n"}


def secret_mount(container: dict[str, Any] = CONTAINER) -> dict[str, Any]:
    """The container's mount of the `secret` volume."""
    mounts: list[dict[str, Any]] = [mount for mount in container["volumeMounts"] if mount["name"] == "secret"]
    (mount,) = mounts
    return mount


def pod_environment(directory: Path, secret: dict[str, str] | None = None) -> dict[str, str]:
    """The ConfigMap's variables as the pod sees them, the Secret's files (`secret`, or as shipped) written
    where its volume puts them: `directory` stands for the mount path."""
    for name, value in (MANIFESTS["Secret"]["stringData"] if secret is None else secret).items():
        (directory / name).write_text(value)
    mount_path = secret_mount()["mountPath"]
    return {name: value.replace(mount_path, str(directory)) for name, value in CONFIG.items()}


def test_the_configmap_holds_settings_the_bridge_accepts_and_points_at_the_secrets_files(
    tmp_path: Path,
) -> None:
    """No secret is a variable: the ConfigMap's only secret settings are `*_FILE`s naming files of the
    Secret's volume, whose keys are file names; SASL's, commented, likewise."""
    assert set(CONFIG) <= OPTION_ENVS
    build("serve", {}, pod_environment(tmp_path, FILLED_SECRET))
    secret = MANIFESTS["Secret"]["stringData"]
    secret_names = [name for name in CONFIG if any(word in name for word in ("TOKEN", "PASSWORD", "SECRET"))]
    assert secret_names == ["BRIDGE_CALLBACK_TOKEN_FILE"]
    mount_path = secret_mount()["mountPath"]
    assert {Path(CONFIG[name]).parent for name in secret_names} == {Path(mount_path)}
    assert {Path(CONFIG[name]).name for name in secret_names} <= set(secret)
    assert not set(secret) & OPTION_ENVS
    assert (
        f"# BRIDGE_SASL_PASSWORD_FILE: {mount_path}/sasl-password\n"
        in (KUBERNETES / "configmap.yaml").read_text()
    )
    assert '# sasl-password: "change-me"\n' in (KUBERNETES / "secret.yaml").read_text()


def test_the_secret_as_shipped_stops_the_bridge_until_its_placeholder_is_replaced(tmp_path: Path) -> None:
    """A forgotten FILL IN must not run a bridge whose token anyone can read in this repository."""
    shipped, filled = tmp_path / "shipped", tmp_path / "filled"
    shipped.mkdir()
    filled.mkdir()
    with pytest.raises(SettingsError, match=r"BRIDGE_CALLBACK_TOKEN_FILE=.*'change-me' is the placeholder"):
        build("serve", {}, pod_environment(shipped))
    require_authentication("serve", build("serve", {}, pod_environment(filled, FILLED_SECRET)))
    unset = {name: value for name, value in CONFIG.items() if name != "BRIDGE_CALLBACK_TOKEN_FILE"}
    with pytest.raises(SettingsError, match="no callback token"):
        require_authentication("serve", build("serve", {}, unset))


def test_the_pods_look_at_the_secrets_files_so_that_a_rotation_needs_no_restart(tmp_path: Path) -> None:
    """Kubernetes sends no SIGHUP when it updates a Secret's volume: the bridge looks every 30 s."""
    assert build("serve", {}, pod_environment(tmp_path, FILLED_SECRET)).reload_interval == 30


def test_compose_starts_the_bridge_open_on_loopback_only_and_signed_once_a_token_is_given() -> None:
    env = env_of("bridge")
    require_authentication("serve", build("serve", {}, env))
    assert all(str(port).startswith("127.0.0.1:") for port in SERVICES["bridge"]["ports"])
    signed = build("serve", {}, {**env, "BRIDGE_CALLBACK_TOKEN": "xxxxyyyy"})
    assert signed.callback_tokens


def test_names_planned_for_other_issues_are_not_options_yet() -> None:
    """Once an issue adds the option, its name leaves PLANNED_ENVS and is checked like any other."""
    assert not set(PLANNED_ENVS) & OPTION_ENVS


def test_the_deployment_reads_the_configmap_and_mounts_the_secret_read_only() -> None:
    """Settings from the ConfigMap's variables; the Secret as a whole volume (a subPath mount is never
    updated), read-only, readable by the bridge's group only; the topics job mounts it alike (SASL)."""
    config_ref = [{"configMapRef": {"name": MANIFESTS["ConfigMap"]["metadata"]["name"]}}]
    assert CONTAINER["envFrom"] == config_ref
    assert "env" not in CONTAINER
    for pod in (POD, MANIFESTS["Job"]["spec"]["template"]["spec"]):
        (volume,) = [volume for volume in pod["volumes"] if volume["name"] == "secret"]
        assert volume["secret"]["secretName"] == MANIFESTS["Secret"]["metadata"]["name"]
        assert volume["secret"]["defaultMode"] & 0o007 == 0
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        (container,) = pod["containers"]
        mount = secret_mount(container)
        assert mount["readOnly"] is True
        assert "subPath" not in mount
        assert mount["mountPath"] == secret_mount()["mountPath"]


def test_the_probes_and_the_service_reach_the_bridges_port(tmp_path: Path) -> None:
    """The Service exposes the callback port only; /readyz and the scrape go to the admin port, which
    listens on every address of the pod (the kubelet and Prometheus come from outside it); /healthz, the
    callback port's one probe, is the startup and liveness check of the listener Tencent reaches."""
    settings = build("serve", {}, pod_environment(tmp_path, FILLED_SECRET))
    callback, admin = CONTAINER["ports"]
    assert callback["containerPort"] == settings.port
    assert admin["containerPort"] == settings.admin_port != settings.port
    assert settings.admin_host is None
    assert settings.host == "0.0.0.0"  # every address of the pod, as the kubelet reaches them
    for probe, path, port in (
        ("livenessProbe", "/healthz", callback),
        ("readinessProbe", "/readyz", admin),
        ("startupProbe", "/healthz", callback),
    ):
        assert CONTAINER[probe]["httpGet"] == {"path": path, "port": port["name"]}
    (service_port,) = MANIFESTS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == callback["name"]
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.admin_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_grace_period_outlasts_the_pre_stop_pause_and_the_drain(tmp_path: Path) -> None:
    settings = build("serve", {}, pod_environment(tmp_path, FILLED_SECRET))
    pre_stop = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(pre_stop)).group(1))  # type: ignore[union-attr]
    assert POD["terminationGracePeriodSeconds"] > pause + drain_seconds(settings)


def test_the_pods_run_unprivileged_on_a_read_only_filesystem_with_resources() -> None:
    for pod in (POD, MANIFESTS["Job"]["spec"]["template"]["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_the_service_hpa_and_pdb_select_the_deployments_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert MANIFESTS["Service"]["spec"]["selector"].items() <= labels.items()
    assert MANIFESTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = MANIFESTS["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    assert (
        MANIFESTS["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
        > MANIFESTS["PodDisruptionBudget"]["spec"]["minAvailable"]
    )


def test_the_topics_job_runs_ensure_with_the_same_settings() -> None:
    (container,) = MANIFESTS["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bridge", "topics", "ensure"]
    assert container["image"] == CONTAINER["image"]
    assert container["envFrom"] == [{"configMapRef": {"name": MANIFESTS["ConfigMap"]["metadata"]["name"]}}]


# --- alerts, dashboard and the metrics a running bridge exports -----------------------------------------


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "bridge.json").read_text())
    return result


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queries() -> list[str]:
    panels = [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    return panels + [rule["expr"] for rule in alert_rules()]


async def exported_sample_names() -> set[str]:
    """Every sample name a bridge can export, from the HELP/TYPE lines of a fresh bridge's /metrics."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    async with TestClient(TestServer(create_app(ServeSettings(), publisher=FakePublisher()))) as client:
        text = await (await client.get("/metrics")).text()
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, [""])
    }


async def test_every_metric_the_alerts_and_the_dashboard_use_is_exported_by_the_bridge() -> None:
    exported = await exported_sample_names()
    used = {name for query in queries() for name in re.findall(r"\b(?:bridge|process)_[a-z_]+\b", query)}
    assert used
    assert used <= exported, used - exported


async def test_the_dashboard_shows_every_bridge_metric() -> None:
    exported = {name for name in await exported_sample_names() if name.startswith("bridge_")}
    shown = " ".join(target["expr"] for panel in dashboard()["panels"] for target in panel["targets"])
    # `_created` (the time a counter started) is a series of its own in the text format; it needs no panel.
    families = {
        re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported if not name.endswith("_created")
    }
    assert {family for family in families if family not in shown} == set()


def test_queries_name_the_scrape_job_prometheus_has() -> None:
    job = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"][0]["job_name"]
    assert set(re.findall(r'job="([^"]+)"', " ".join(queries()))) == {job}


@pytest.mark.parametrize(
    ("concern", "pattern"),
    [
        ("error ratio", r'bridge_callbacks_total\{outcome=~"failed\|ambiguous"\}'),
        ("latency near the 2 s budget", r"bridge_request_duration_seconds_bucket.*> 1\.5"),
        ("broker unavailable", r"bridge_broker_ready == 0"),
        ("nothing received", r"bridge_last_request_timestamp_seconds"),
    ],
)
def test_an_alert_covers(concern: str, pattern: str) -> None:
    assert any(re.search(pattern, " ".join(rule["expr"].split())) for rule in alert_rules()), concern


# --- the README's deployment sections ----------------------------------------------------------------------


README = (ROOT / "README.md").read_text()


def test_the_readme_curl_reaches_the_compose_bridge() -> None:
    settings = build("serve", {}, env_of("bridge"))
    assert "docker compose up" in README
    assert f"http://127.0.0.1:{settings.port}{settings.path}?" in README


async def test_the_readmes_metrics_table_lists_exactly_the_bridge_metrics() -> None:
    exported = {name for name in await exported_sample_names() if name.startswith("bridge_")}
    listed = set(re.findall(r"^\| `(bridge_[a-z_]+)`", README, flags=re.MULTILINE))
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name) for name in exported if not name.endswith("_created")
    }
    assert listed == families
