"""`skunq web` comes from the plugin through register_commands; without the plugin it says what to install."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from skunkqueue.cli import main


def test_the_plugin_adds_skunq_web() -> None:
    result = CliRunner().invoke(main, ["web", "--help"])
    assert result.exit_code == 0
    assert "--token" in result.output and "127.0.0.1" in result.output


def test_without_the_plugin_skunq_web_says_what_to_install() -> None:
    # Block the installed plugin before the CLI asks plugins for commands, as if it were not installed.
    code = ("from skunkqueue.hooks import plugin_manager; plugin_manager().set_blocked('web'); "
            "from skunkqueue.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "web", "-q", "q", "--port", "9"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: skunq web needs the monitor plugin: pip install skunkqueue-web"


def test_unknown_backend_and_busy_port_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    unknown = subprocess.run([sys.executable, "-m", "skunkqueue.cli", "web", "-q", "q", "--backend", "nosuch"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "No SkunkQueue backend named 'nosuch'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "skunkqueue.cli", "web", "-q", "q", "--url",
                               str(tmp_path / "q.db"), "--port", str(port)], capture_output=True, text=True,
                              timeout=60)
    assert busy.returncode == 1 and f"Cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr


def test_a_broken_plugin_costs_only_its_own_commands() -> None:
    code = ("from skunkqueue.hooks import plugin_manager, hookimpl\n"
            "class Broken:\n"
            "    @hookimpl\n"
            "    def register_commands(self, cli):\n"
            "        raise RuntimeError('plugin bug')\n"
            "plugin_manager().register(Broken(), name='broken')\n"
            "from skunkqueue.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code, "web", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--token" in done.stdout  # skunq web is still there
    assert "skunq: plugin broken failed to add its commands: plugin bug" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_loading_plugins_do_not_load_the_web_stack() -> None:
    # Every worker loads the plugins to run their hooks: the monitor must cost them nothing.
    code = ("import sys; from skunkqueue.hooks import plugin_manager; pm = plugin_manager(); "
            "print(pm.has_plugin('web'), sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'prometheus_client') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True []", done.stdout + done.stderr
