"""Start and stop throwaway PostgreSQL servers for the tests.

Every server is a fresh cluster (``initdb``) in a temporary folder, listening
on a free loopback port and on a Unix socket in that folder, so the tests
never touch a PostgreSQL someone else is using (a system server may listen on
5432). PostgreSQL refuses to run as root: when the tests run as root the
cluster belongs to the ``postgres`` user and its programs run through
``runuser``; the folder is then made outside pytest's temporary folders,
which only root may enter.

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, installed
by ``scripts/ensure-servers``), or those in ``$SKUNQ_PG_BIN``, or ``initdb``
on the PATH.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skunkqueue.testing.kit import free_port

SUPERUSER = "postgres"
# Who owns the cluster when the tests run as root (Debian's package creates this user).
OS_USER = "postgres"


def bin_dir() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: $SKUNQ_PG_BIN, else the newest Debian one, else the PATH's."""
    if os.environ.get("SKUNQ_PG_BIN"):
        return Path(os.environ["SKUNQ_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def available() -> bool:
    folder = bin_dir()
    return folder is not None and (folder / "initdb").exists()


def _as_owner() -> list[str]:
    """The prefix that runs a PostgreSQL program as the cluster's owner."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", OS_USER, "--"]


@dataclass
class PostgresServer:
    """One PostgreSQL cluster; start() and stop() may be repeated on the same port and data.

    ``durable=False`` (the default) turns off fsync: a server process that is
    killed loses nothing (the kernel still has every write), only a crash of
    the machine would, and the tests run several times faster on a busy
    machine. ``settings`` are more ``-c name=value`` pairs.
    """

    directory: Path | None = None
    port: int = 0
    password: str | None = None
    durable: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    _made_directory: bool = False

    def __post_init__(self) -> None:
        if self.directory is None or os.geteuid() == 0:
            # Root's pytest folders are closed to the postgres user: make one of our own in /tmp.
            self.directory = Path(tempfile.mkdtemp(prefix="skunq-pg-"))
            self._made_directory = True
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def folder(self) -> Path:
        assert self.directory is not None
        return self.directory

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def url(self) -> str:
        auth = f"{SUPERUSER}:{self.password}" if self.password else SUPERUSER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def url_for(self, user: str, password: str, database: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        folder = bin_dir()
        if folder is None:
            raise RuntimeError("PostgreSQL is not installed: run scripts/ensure-servers "
                               "(apt-get install postgresql) or set SKUNQ_PG_BIN")
        program = str(folder / args[0])
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return subprocess.run([*_as_owner(), program, *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=self.folder, env=env)

    def _give_to_owner(self, path: Path) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def init(self) -> None:
        self._give_to_owner(self.folder)
        args = ["initdb", "-D", str(self.data), "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
        if self.password:
            pwfile = self.folder / "pwfile"
            pwfile.write_text(self.password + "\n")
            self._give_to_owner(pwfile)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        done = self._run(*args)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")

    def options(self) -> str:
        settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.folder),
                    "max_connections": "300", "shared_buffers": "64MB"}
        if not self.durable:
            settings.update(fsync="off", full_page_writes="off")
        settings.update(self.settings)
        return " ".join([f"-p {self.port}"] + [f"-c {name}={value}" for name, value in settings.items()])

    def start(self, timeout: float = 60.0) -> PostgresServer:
        self.port = self.port or free_port()
        if not (self.data / "PG_VERSION").exists():
            self.init()
        done = self._run("pg_ctl", "-D", str(self.data), "-o", self.options(), "-l", str(self.folder / "server.log"),
                         "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL on port {self.port} did not start: {done.stdout}{done.stderr}"
                               f"{self.log()}")
        return self

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash; what was committed is in the WAL."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        for victim in [pid, *map(int, children)]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.05)
        # The dead postmaster may linger as a zombie (pg_ctl, its parent, exited long ago and nobody
        # here reaps orphans): PostgreSQL would take its pid in the lock file for a live server.
        if not self._alive(pid):
            for lock in [self.data / "postmaster.pid", *self.folder.glob(".s.PGSQL.*")]:
                lock.unlink(missing_ok=True)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie is dead enough (its parent, pg_ctl, exited long ago).
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server and delete its folder (if this object made it)."""
        self.stop("immediate")
        if self._made_directory:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        path = self.folder / "server.log"
        try:
            return path.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser through the Unix socket (for test set-up)."""
        done = self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.folder),
                         "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout


@dataclass
class PostgresReplica(PostgresServer):
    """A streaming replica of ``primary``: ``pg_basebackup -R`` of its data, started in standby mode.

    ``name`` is the ``application_name`` it streams as, which the primary's
    ``synchronous_standby_names`` may list. :meth:`promote` makes it a primary.
    """

    primary: PostgresServer | None = None
    name: str = "replica1"

    def init(self) -> None:
        assert self.primary is not None
        self._give_to_owner(self.folder)
        conninfo = f"host=127.0.0.1 port={self.primary.port} user={SUPERUSER} application_name={self.name}"
        done = self._run("pg_basebackup", "-D", str(self.data), "-d", conninfo, "-R", "-X", "stream",
                         "--no-sync", "-c", "fast")
        if done.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {done.stdout}{done.stderr}")

    def promote(self, timeout: float = 60.0) -> None:
        done = self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(int(timeout)), "promote",
                         timeout=timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(f"promotion failed: {done.stdout}{done.stderr}{self.log()}")

    def streaming(self) -> bool:
        assert self.primary is not None
        try:
            return self.name in self.primary.psql("SELECT application_name FROM pg_stat_replication "
                                                  "WHERE state = 'streaming'")
        except RuntimeError:
            return False
