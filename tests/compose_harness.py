"""docker-compose.yml run as local processes (Docker cannot run here): what Compose would do.

Reads the compose file and a ``.env`` like Compose (``${VAR}``, ``${VAR:-default}``,
``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``, ``$$``), then starts every service
built from this repository with the command and environment Compose gives it. What a container
would have differently is rewritten, nothing else: container ports to free loopback ports
(``expose``/``ports``), service hostnames to those ports, volume targets to local paths (bind
mounts to the repository file, named volumes to temporary directories), servers bound to
127.0.0.1. Third-party services run as local equivalents: the embedded broker for ``kafka``,
``kafka-init``'s own script with ``kafka-topics.sh`` answered by :mod:`tests.kafka_topics_shim`,
``redis-server`` with the redis service's command, Debian's ``prometheus`` and
``prometheus-alertmanager`` with the repository's config files and the services' arguments.
Grafana is not started (no local binary); its provisioning is checked by test_ops_dashboards.

Profiles as Compose applies them: ``COMPOSE_PROFILES`` of the ``.env`` picks the services that
``up`` starts (a service without ``profiles`` always), and a dependency on a service left out is
refused unless it says ``required: false``. Without the ``kafka`` profile no broker is started:
``FUNNEL_BROKER`` of the ``.env`` names one (a managed Kafka). One-off services (``restart:
"no"`` and built here, e.g. ``backfill``) run with :meth:`Stack.run`, as ``docker compose run
--rm`` does, and as the image's user would: in a working directory it cannot write, with only the
named volumes the Dockerfile created for that user writable (``chown funnel``); as root the
process runs as ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from streams.crm.sources.settings import SourceSettings
from streams.kafka import topics
from streams.tools.broker import EmbeddedBroker, free_port
from streams.tools.cli import parser as cli_parser

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Topics the stack writes for readers outside it (docs/consuming.md): KPI and alert streams for
# dashboards and apps, and the dead letters an operator inspects and replays.
OUTPUT_TOPICS = {topics.KPIS, topics.ALERTS, topics.DLQ}
# Third-party images and the local program that stands in for each.
THIRD_PARTY = {"kafka", "kafka-init", "redis", "prometheus", "alertmanager", "grafana"}
VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|(\w+))")


class ComposeError(Exception):
    """What ``docker compose up`` would refuse, or a stack that does not work as composed."""


# ------------------------------------------------------------------ .env and interpolation
def read_env_file(path: Path) -> dict[str, str]:
    """Compose's .env syntax: KEY=VALUE lines, # comments, optional quotes."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def write_env_file(example: Path, target: Path, values: dict[str, str]) -> Path:
    """``.env`` from ``.env.example``: every ``KEY=`` line with a given value gets it; the others
    keep the example's value. Values for keys the example does not name are refused."""
    lines = example.read_text().splitlines()
    named = {m.group(1) for line in lines if (m := re.match(r"^(\w+)=", line))}
    unknown = set(values) - named
    if unknown:
        raise ComposeError(f".env.example does not document {sorted(unknown)}")
    out = [
        f"{m.group(1)}={values[m.group(1)]}" if (m := re.match(r"^(\w+)=", line)) and m.group(1) in values
        else line
        for line in lines
    ]
    target.write_text("\n".join(out) + "\n")
    return target


def interpolate(value, env: dict[str, str]):
    """Compose interpolation of every string in a parsed compose file (keys stay as they are)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return interpolate(arg, env) if unset else current
        if op in (":?", "?"):
            if unset:
                raise ComposeError(f"required variable {name} is missing a value: {arg}")
            return current
        return current or ""

    return VARIABLE.sub(substitute, value)


def load_compose(path: Path, env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), env)


def project_services(compose: dict) -> dict[str, dict]:
    """Services built from this repository (the Dockerfile at the compose file's directory)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def active_profiles(env: dict[str, str]) -> set[str]:
    """``COMPOSE_PROFILES`` (comma-separated) as Compose reads it from the ``.env``."""
    return {p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()}


def active_services(compose: dict, profiles: set[str]) -> set[str]:
    """What ``docker compose up`` starts: services without profiles, or with an active one."""
    return {name for name, svc in compose["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & profiles}


def dependency_problems(compose: dict, active: set[str]) -> list[str]:
    """Compose refuses a started service whose dependency is not started, unless the
    dependency says ``required: false`` (then the service starts without waiting)."""
    problems = []
    for name in sorted(active):
        for dep, spec in (compose["services"][name].get("depends_on") or {}).items():
            if dep not in compose["services"]:
                problems.append(f"{name} depends on undefined service {dep}")
            elif dep not in active and (spec or {}).get("required", True) is not False:
                problems.append(f"{name} depends on {dep}, which the active profiles leave out")
    return problems


def service_argv(svc: dict, command: list[str] | None = None) -> list[str]:
    """entrypoint + command, as the container runs it (``docker compose run`` replaces the
    command)."""
    return [*(svc.get("entrypoint") or []), *(svc.get("command") if command is None else command)]


def dockerfile_user_dirs(dockerfile: Path = REPO / "Dockerfile") -> tuple[str, set[str]]:
    """The image's ``USER`` and the directories its Dockerfile gives that user (``chown``)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    user = users[-1] if users else "root"
    owned = {path for m in re.finditer(rf"chown\s+(?:-R\s+)?{re.escape(user)}(?::\S+)?\s+([^&;\n]+)", text)
             for path in m.group(1).split()}
    return user, owned


# ------------------------------------------------------------------ static topology check
def _service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _source_settings(env: dict[str, str]) -> SourceSettings:
    fields = SourceSettings.model_fields
    given = {k.removeprefix("FUNNEL_").lower(): v for k, v in env.items() if k.startswith("FUNNEL_")}
    return SourceSettings(**{k: v for k, v in given.items() if k in fields and v != ""})


def topic_flow(svc: dict) -> tuple[set[str], set[str]]:
    """(topics read, topics written) of a project service, from its command and settings."""
    command = service_argv(svc)
    if command[:2] == ["funnel-kpi", "backfill"]:
        # a one-off: `docker compose run --rm backfill <crm> ...` names the CRM
        command = ["funnel-kpi", "backfill", "hubspot", "--dry-run"]
    if command[0] != "funnel-kpi":
        raise ComposeError(f"unexpected command {command}: expected funnel-kpi <command>")
    try:
        args = cli_parser().parse_args(command[1:])
    except SystemExit:
        raise ComposeError(f"funnel-kpi does not accept {shlex.join(command)}") from None
    env = _service_env(svc)
    if args.command == "worker":
        return {topics.EVENTS}, {topics.KPIS, topics.ALERTS, topics.DLQ}
    if args.command == "ingest":
        sources = _source_settings(env)
        return set(), {sources.hubspot_topic, sources.pipedrive_topic}
    if args.command == "adapt":
        return set(_source_settings(env).raw_topics), {topics.EVENTS, topics.DLQ}
    if args.command == "backfill":
        return set(), {topics.EVENTS}
    if args.command == "salesforce-cdc":  # Pub/Sub API change events, adapted by `adapt`
        return set(), {"crm.raw.salesforce"}
    raise ComposeError(f"{shlex.join(command)} is not a service command "
                       "(worker, ingest, adapt, backfill, salesforce-cdc)")


def topology_problems(compose: dict) -> list[str]:
    """Every topic a compose service writes must be read by one (or be an output topic)."""
    problems = []
    read: set[str] = set()
    written: dict[str, list[str]] = {}
    for name, svc in project_services(compose).items():
        try:
            reads, writes = topic_flow(svc)
        except ComposeError as exc:
            problems.append(f"{name}: {exc}")
            continue
        read |= reads
        for topic in writes:
            written.setdefault(topic, []).append(name)
    for topic, writers in sorted(written.items()):
        if topic not in read and topic not in OUTPUT_TOPICS:
            problems.append(f"{topic} is written by {', '.join(writers)} and read by no service")
    return problems


# ------------------------------------------------------------------ processes
def container_ports(svc: dict) -> set[str]:
    ports = {str(p) for p in svc.get("expose", [])}
    for mapping in svc.get("ports", []):
        ports.add(str(mapping).rsplit(":", 1)[-1].split("/")[0])
    return ports


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    process: subprocess.Popen | None = None
    user: tuple[int, int] | None = None  # (uid, gid) to run as, None: this process's

    def start(self) -> Process:
        argv = self.argv
        if self.user is not None:  # util-linux setpriv (Popen(user=) is refused exec here)
            argv = ["setpriv", f"--reuid={self.user[0]}", f"--regid={self.user[1]}", "--clear-groups",
                    *argv]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """The compose stack as local processes; ``start()`` then ``stop()`` (or use ``with``)."""

    compose_file: Path
    env_file: Path
    workdir: Path
    # Harness-only additions, not in compose: Tansu cannot pass Faust's recovery check (see
    # tests/conftest.py) and group joins need short timeouts on a test machine.
    worker_overrides: dict[str, str] = field(default_factory=lambda: {
        "FUNNEL_SESSION_TIMEOUT": "6",
        "FUNNEL_REBALANCE_TIMEOUT": "6",
        "FUNNEL_RECOVERY_CONSISTENCY_CHECK": "false",
    })
    # Test copies of the rule and Alertmanager files may compress time (for:, group_wait).
    rule_files: list[Path] | None = None
    alertmanager_template: Path | None = None
    scrape_interval: str = "1s"
    # Relative bind mounts resolve here (`docker compose --project-directory`).
    project_dir: Path = REPO

    def __post_init__(self) -> None:
        self.env = read_env_file(self.env_file)
        self.compose = load_compose(self.compose_file, self.env)
        self.services: dict[str, dict] = self.compose["services"]
        self.profiles = active_profiles(self.env)
        self.active = active_services(self.compose, self.profiles)
        self.processes: dict[str, Process] = {}
        self.run_as: tuple[int, int] | None = None  # (uid, gid) of the service being run, if not ours
        self.ports: dict[tuple[str, str], int] = {}  # (service, container port) -> local port
        self.broker: EmbeddedBroker | None = None
        self.created_topics: set[str] = set()  # what kafka-init created

    # ---------------------------------------------------------------- preflight (no process)
    def preflight(self) -> None:
        """What fails before anything runs: unknown services, commands, broken topology."""
        missing = {"kafka", "kafka-init", "redis", "prometheus", "alertmanager"} - set(self.services)
        if missing:
            raise ComposeError(f"services missing from the compose file: {sorted(missing)}")
        unknown = set(self.services) - THIRD_PARTY - set(project_services(self.compose))
        if unknown:
            raise ComposeError(f"services neither built here nor replaced locally: {sorted(unknown)}")
        problems = topology_problems(self.compose)
        if problems:
            raise ComposeError("incomplete topology:\n  " + "\n  ".join(problems))
        problems = dependency_problems(self.compose, self.active)
        if problems:
            raise ComposeError(f"profiles {sorted(self.profiles)}:\n  " + "\n  ".join(problems))

    # ---------------------------------------------------------------- rewrites
    def port(self, service: str, container_port: str | int) -> int:
        key = (service, str(container_port))
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def address(self, host: str, port: str) -> str:
        """``service:port`` as seen from another container -> the local address."""
        if host == "kafka":
            if "kafka" not in self.active:
                raise ComposeError(f"kafka:{port} is named, but the active profiles "
                                   f"{sorted(self.profiles)} leave the bundled Kafka out")
            assert self.broker is not None
            return self.broker.url.split("://", 1)[1]
        if host not in self.services:
            return f"{host}:{port}"
        return f"127.0.0.1:{self.port(host, port)}"

    def paths(self, service: str) -> dict[str, str]:
        """Mount target -> local path: bind mounts and secrets to the host file, named volumes
        to tmp."""
        out = {}
        for secret in self.services[service].get("secrets", []):
            if isinstance(secret, str):
                secret = {"source": secret}
            name, target = secret["source"], secret.get("target")
            declared = (self.compose.get("secrets") or {}).get(name)
            if declared is None or "file" not in declared:
                raise ComposeError(f"{service}: secret {name} is not declared with a file")
            target = target if target and target.startswith("/") else f"/run/secrets/{target or name}"
            out[target] = self._host_path(service, declared["file"])
        for volume in self.services[service].get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith((".", "/")):
                out[target] = self._host_path(service, source)
            else:
                if source not in (self.compose.get("volumes") or {}):
                    raise ComposeError(f"{service}: volume {source} is not declared")
                local = self.workdir / "volumes" / source
                local.mkdir(parents=True, exist_ok=True)
                out[target] = str(local)
                if self.run_as is not None and target in dockerfile_user_dirs()[1]:
                    os.chown(local, *self.run_as)  # a new volume takes the image directory's owner
        return out

    def _host_path(self, service: str, source: str) -> str:
        """A bind source as Docker needs it: existing (Compose creates no missing secret file)."""
        local = (self.project_dir / source).resolve()
        if not local.exists():
            raise ComposeError(f"{service}: bind mount source {source} does not exist")
        return str(local)

    def rewrite(self, service: str, value: str) -> str:
        """A value as the local process needs it: hosts, ports and paths of this machine."""
        value = re.sub(
            r"(?<![\w.-])([a-z][\w-]*):(\d+)(?=[/\s\"';]|$)",
            lambda m: self.address(m.group(1), m.group(2)),
            value,
        )
        if value in container_ports(self.services[service]):
            value = str(self.port(service, value))
        for target, local in sorted(self.paths(service).items(), key=lambda kv: -len(kv[0])):
            if value == target or value.startswith(target + "/"):
                value = local + value[len(target):]
            value = re.sub(rf"(?<=[=\s]){re.escape(target)}(?=/|$|\s)", local, value)
        return value

    def service_env(self, service: str) -> dict[str, str]:
        return {k: self.rewrite(service, v) for k, v in _service_env(self.services[service]).items()}

    # ---------------------------------------------------------------- third-party stand-ins
    def start_kafka(self) -> None:
        self.broker = EmbeddedBroker(log_path=self.workdir / "kafka.log")
        self.broker.start()

    def run_kafka_init(self) -> None:
        """kafka-init's own script, with kafka-topics.sh answered against the local broker."""
        svc = self.services["kafka-init"]
        shim = self.workdir / "kafka-topics.sh"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m tests.kafka_topics_shim "$@"\n')
        shim.chmod(0o755)
        script = svc["command"][0].replace("/opt/kafka/bin/kafka-topics.sh", str(shim))
        script = self.rewrite("kafka-init", script)
        entry = svc["entrypoint"]
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **self.service_env("kafka-init")}
        res = subprocess.run([*entry, script], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        (self.workdir / "kafka-init.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise ComposeError(f"kafka-init failed ({res.returncode}): {res.stdout}{res.stderr}")
        self.created_topics = set(res.stdout.split())

    def start_redis(self) -> None:
        svc = self.services["redis"]
        port = self.port("redis", 6379)
        argv = [*svc["command"]]
        argv[-1] = argv[-1].replace("redis-server ", f"redis-server --port {port} --bind 127.0.0.1 ", 1)
        self._spawn("redis", argv, {"PATH": os.environ["PATH"], **_service_env(svc)})

    def prometheus_config(self) -> Path:
        config = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = self.scrape_interval
        config["global"]["evaluation_interval"] = self.scrape_interval
        rules = self.rule_files or sorted((REPO / "prometheus/rules").glob("*.yml"))
        config["rule_files"] = [str(p) for p in rules]
        for job in config["scrape_configs"]:
            targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            targets += [f"{n}:{sd['port']}" for sd in job.pop("dns_sd_configs", []) for n in sd["names"]]
            local = []
            for target in targets:
                host, port = target.rsplit(":", 1)
                if host == "localhost" and job["job_name"] == "prometheus":
                    host = "prometheus"
                if host not in self.services:
                    raise ComposeError(f"prometheus job {job['job_name']} scrapes {target}: no such service")
                local.append(self.address(host, port))
            job["static_configs"] = [{"targets": local}]
        for am in config["alerting"]["alertmanagers"]:
            for sc in am["static_configs"]:
                sc["targets"] = [self.address(*t.rsplit(":", 1)) for t in sc["targets"]]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_prometheus(self) -> None:
        """The service's entrypoint (prometheus-render.sh) renders the harness's copy of
        prometheus.yml (local targets, absolute rule paths) and starts Debian's prometheus."""
        svc = self.services["prometheus"]
        config = self.prometheus_config()
        argv = [self.rewrite("prometheus", arg) for arg in service_argv(svc)]
        if not svc.get("entrypoint"):
            argv = [shutil.which("prometheus") or "prometheus"] + [
                f"--config.file={config}" if a.startswith("--config.file=") else a for a in argv]
        argv.append(f"--web.listen-address=127.0.0.1:{self.port('prometheus', 9090)}")
        env = {"PATH": os.environ["PATH"], **self.service_env("prometheus"),
               "PROMETHEUS_TEMPLATE": str(config),
               "PROMETHEUS_BIN": shutil.which("prometheus") or "prometheus"}
        self._spawn("prometheus", argv, env)

    def start_alertmanager(self) -> None:
        svc = self.services["alertmanager"]
        env = {"PATH": os.environ["PATH"], **self.service_env("alertmanager"),
               "ALERTMANAGER_BIN": shutil.which("prometheus-alertmanager") or "prometheus-alertmanager"}
        if self.alertmanager_template is not None:
            env["ALERTMANAGER_TEMPLATE"] = str(self.alertmanager_template)
        argv = [self.rewrite("alertmanager", a) for a in [*svc["entrypoint"], *svc["command"]]]
        argv += [f"--web.listen-address=127.0.0.1:{self.port('alertmanager', 9093)}",
                 "--cluster.listen-address="]
        self._spawn("alertmanager", argv, env)

    # ---------------------------------------------------------------- this project's services
    def start_project_service(self, name: str) -> None:
        svc = self.services[name]
        command = service_argv(svc)
        if command[0] != "funnel-kpi":
            raise ComposeError(f"{name}: unexpected command {command}")
        env = {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            **self.service_env(name),
            # inside a container 0.0.0.0 is private; here servers stay on loopback
            "FUNNEL_WEB_BIND": "127.0.0.1",
            "FUNNEL_INGEST_BIND": "127.0.0.1",
        }
        if command[1] == "worker":
            env.update(self.worker_overrides)
        self._spawn(name, [str(VENV_BIN / command[0]), *command[1:]], env)

    def run(self, name: str, *args: str) -> Process:
        """``docker compose run --rm <name> [args]`` of a service built here (started, not
        waited for): entrypoint + args (or the service's command), its environment and volumes,
        as the image's user: the working directory (the image's root-owned /app) is not
        writable, nor is a named volume unless the Dockerfile made its directory the user's.
        Running as root, the process runs as ``nobody`` (every path it needs must be reachable)."""
        svc = self.services[name]
        if "build" not in svc:
            raise ComposeError(f"{name} is not built from this repository")
        user, _ = dockerfile_user_dirs()
        if user != "root" and os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.run_as = (nobody.pw_uid, nobody.pw_gid)
        try:
            command = service_argv(svc, list(args) if args else None)
            if command[0] != "funnel-kpi":
                raise ComposeError(f"{name}: unexpected command {command}")
            env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", **self.service_env(name)}
            cwd = self.workdir / "cwd" / name
            cwd.mkdir(parents=True, exist_ok=True)
            if user != "root":
                cwd.chmod(0o555)  # WORKDIR /app belongs to root
            log = self.workdir / f"{name}.log"
            process = Process(name, [str(VENV_BIN / command[0]), *command[1:]], env, cwd, log)
            process.user = self.run_as
            self.processes[name] = process.start()
            return process
        finally:
            self.run_as = None

    def healthy(self, name: str) -> bool:
        """The service's own compose healthcheck, run with its (rewritten) environment; a
        process that exited raises."""
        process = self.processes[name]
        if process.exited() is not None:
            raise ComposeError(f"{name} exited with {process.exited()}:\n{process.log_tail()}")
        check = self.services[name]["healthcheck"]
        test = check["test"]
        assert test[0] == "CMD", f"{name}: only CMD healthchecks are run here"
        argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
        res = subprocess.run(argv, env=process.env, capture_output=True, timeout=30)
        return res.returncode == 0

    def restart(self, name: str) -> None:
        """`docker compose restart <name>`: the same command, environment and volumes."""
        old = self.processes[name]
        old.stop()
        self.processes[name] = Process(name, old.argv, old.env, old.cwd, old.log_path).start()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        cwd = self.workdir / "cwd" / name
        cwd.mkdir(parents=True, exist_ok=True)
        self.processes[name] = Process(name, argv, env, cwd, self.workdir / f"{name}.log").start()

    # ---------------------------------------------------------------- lifecycle
    def start(self, only: set[str] | None = None) -> Stack:
        """Every service; ``only``: just Kafka (with kafka-init) and these project services."""
        self.preflight()
        try:
            if "kafka" in self.active:
                self.start_kafka()
            if "kafka-init" in self.active:
                self.run_kafka_init()
            if only is None:
                self.start_redis()
                self.start_alertmanager()
            for name, svc in project_services(self.compose).items():
                if name not in self.active or svc.get("restart") == "no":
                    continue  # another profile's, or a one-off (Stack.run)
                if only is None or name in only:
                    self.start_project_service(name)
            if only is None:
                self.start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Stack:
        return self if self.processes or self.broker else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, service: str, container_port: int, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port(service, container_port)}{path}"

    def get(self, service: str, container_port: int, path: str) -> bytes:
        with urllib.request.urlopen(self.url(service, container_port, path), timeout=5) as response:
            return response.read()
