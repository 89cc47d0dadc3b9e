"""Start a real Flower consortium on this machine: one `flower-superlink`, N `flower-supernode`s, `flwr run`.

TLS and SuperNode authentication are on by default: the SuperLink gets a certificate signed by a fresh
consortium CA (SANs 127.0.0.1 and localhost), ``--enable-supernode-auth``, and every site's public key is
registered with ``flwr supernode register`` before its SuperNode starts with its private key. An
unregistered node is refused by the SuperLink. ``insecure=True`` turns both off and says so loudly.

Every process writes its own log under ``<out>/logs/``; every port is probed free on 127.0.0.1 so two
consortia on one machine do not collide; every process is started in its own session and stopped by its
process group (only processes started here are ever signalled).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .certs import make_ca, make_node_key, make_server_cert

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FEDERATION = "dpsynth-local"

log = logging.getLogger("dpsynth.deploy")

INSECURE_WARNING = """
################################################################################################
#  INSECURE MODE: TLS is OFF and SuperNode authentication is OFF.                                #
#  Model weights, budgets and audit results travel in clear text and ANY process that can reach  #
#  the SuperLink can join the consortium. Use only for debugging on a trusted machine.           #
################################################################################################"""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _toml_str(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def kv_config(d: dict) -> str:
    """{'a': 1, 'b': 'x'} → 'a=1 b="x"' (the format of --node-config and --run-config)."""
    return " ".join(f"{k}={_toml_str(v)}" for k, v in d.items())


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class LocalConsortium:
    out: Path
    insecure: bool = False
    app_dir: Path = REPO
    env_extra: dict = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    superlink_port: int | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        self.logs = self.out / "logs"
        self.pki_dir = self.out / "pki"
        self.node_keys = self.out / "node-keys"
        self.flwr_home = self.out / "flwr"
        for d in (self.logs, self.flwr_home):
            d.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
            log.warning("INSECURE MODE: TLS and SuperNode authentication are disabled")

    # ---- environment -------------------------------------------------------------------------------
    def env(self, home: str) -> dict:
        e = dict(os.environ)
        e.update({
            "FLWR_HOME": str(self.flwr_home / home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PATH": f"{BIN}{os.pathsep}{e.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            # every site's ClientApp runs on the same few cores, one thread each (more oversubscribe them); the
            # coordinator (SuperLink → ServerApp) samples the candidate release while the sites wait, on every core
            "OMP_NUM_THREADS": e.get("OMP_NUM_THREADS", str(os.cpu_count() or 1) if home == "superlink" else "1"),
            "MPLBACKEND": "Agg",
        })
        # the apps import dpsynth / audits / client / server from the FAB; the repo on the path is a fallback
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.app_dir), e.get("PYTHONPATH", "")) if p)
        e.update(self.env_extra)
        return e

    def _start(self, name: str, cmd: list[str], *, home: str, port: int | None = None, cwd: Path | None = None) -> Proc:
        if name in self.procs and self.procs[name].alive():
            raise RuntimeError(f"{name} is already running")
        log_path = self.logs / f"{name}.log"
        f = open(log_path, "ab")
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        cwd = cwd or (self.out / "cwd" / name)
        cwd.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / home).mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(home), cwd=cwd,
                             start_new_session=True)
        f.close()
        proc = Proc(name, p, log_path, port)
        self.procs[name] = proc
        return proc

    # ---- PKI -------------------------------------------------------------------------------------------
    def make_pki(self) -> None:
        if not (self.pki_dir / "ca.pem").exists():
            ca, ca_key = make_ca(self.pki_dir)
            make_server_cert(self.pki_dir, ca_cert=ca, ca_key=ca_key, hosts=("127.0.0.1", "localhost"),
                             name="superlink")

    def node_key(self, site: str) -> tuple[Path, Path]:
        priv, pub = self.node_keys / f"{site}.key", self.node_keys / f"{site}.pub"
        if not priv.exists():
            make_node_key(self.node_keys, site)
        return priv, pub

    # ---- SuperLink -----------------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> Proc:
        for attempt in range(3):
            port = free_port()
            cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                   "--disable-runtime-dependency-installation"]
            if self.insecure:
                cmd += ["--insecure"]
            else:
                self.make_pki()
                cmd += ["--ssl-ca-certfile", str(self.pki_dir / "ca.pem"),
                        "--ssl-certfile", str(self.pki_dir / "superlink.pem"),
                        "--ssl-keyfile", str(self.pki_dir / "superlink.key"),
                        "--enable-supernode-auth"]
            proc = self._start("superlink", cmd, home="superlink", port=port)
            end = time.time() + timeout
            while time.time() < end and proc.alive():
                if _port_open(port):
                    self.superlink_port = port
                    self.write_cli_config()
                    log.info("SuperLink up on 127.0.0.1:%d (%s)", port, "INSECURE" if self.insecure else "TLS + node auth")
                    return proc
                time.sleep(0.2)
            self.stop_one("superlink")
            if "address already in use" not in proc.log_text().lower():
                break
        raise RuntimeError(f"the SuperLink did not start; see {proc.log_path}:\n{proc.log_text()[-3000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def write_cli_config(self) -> Path:
        home = self.flwr_home / "cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{FEDERATION}"', "", f"[superlink.{FEDERATION}]",
                 f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.pki_dir / "ca.pem"}"')
        p = home / "config.toml"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return p

    def flwr(self, args: list[str], *, name: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "flwr"), *args]
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode())
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env("cli"),
                                  cwd=self.app_dir, timeout=timeout, check=False)

    def register(self, site: str) -> None:
        """Register a site's public node key with the SuperLink (the coordinator does this)."""
        if self.insecure:
            return
        _, pub = self.node_key(site)
        r = self.flwr(["supernode", "register", str(pub), FEDERATION], name=f"register_{site}")
        text = (self.logs / f"register_{site}.log").read_text(errors="replace")
        if r.returncode != 0 or "registered successfully" not in text:
            raise RuntimeError(f"registering site {site} failed (rc {r.returncode}); see {self.logs / f'register_{site}.log'}"
                               f":\n{text[-2000:]}")
        log.info("registered site %s's node key", site)

    # ---- SuperNodes ----------------------------------------------------------------------------------
    def start_supernode(self, site: str, *, data_path: Path, site_dir: Path, policy_path: Path | None,
                        extra_node_config: dict | None = None, key: Path | None = None, name: str | None = None) -> Proc:
        port = free_port()
        node_cfg = {"site": site, "data-path": str(Path(data_path).resolve()), "site-dir": str(Path(site_dir).resolve())}
        if policy_path is not None:
            node_cfg["policy-path"] = str(Path(policy_path).resolve())
        node_cfg.update(extra_node_config or {})
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1", "--port", str(port),
               "--node-config", kv_config(node_cfg)]
        if self.insecure:
            cmd += ["--insecure"]
        else:
            priv = key if key is not None else self.node_key(site)[0]
            cmd += ["--root-certificates", str(self.pki_dir / "ca.pem"), "--auth-supernode-private-key", str(priv)]
        return self._start(name or f"supernode_{site}", cmd, home=f"supernode_{site}", port=port)

    def wait_nodes_connected(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until each SuperNode's log shows it connected (or it died)."""
        end = time.time() + timeout
        pending = set(names)
        while pending and time.time() < end:
            for n in list(pending):
                p = self.procs[n]
                if not p.alive():
                    raise RuntimeError(f"{n} exited with {p.popen.returncode}; see {p.log_path}:\n{p.log_text()[-2000:]}")
                if "Starting Flower SuperNode" in p.log_text():
                    pending.discard(n)
            time.sleep(0.2)

    # ---- the run -------------------------------------------------------------------------------------
    def run_app(self, run_config: dict, *, timeout: float = 1800.0, echo: bool = True) -> int:
        args = ["run", str(self.app_dir), FEDERATION, "--stream"]
        if run_config:
            args += ["--run-config", kv_config(run_config)]
        cmd = [str(BIN / "flwr"), *args]
        log_path = self.logs / "flwr_run.log"
        with open(log_path, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode())
            f.flush()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env("cli"),
                                 cwd=self.app_dir, start_new_session=True)
            self.procs["flwr_run"] = Proc("flwr_run", p, log_path)
            end = time.time() + timeout
            assert p.stdout is not None
            os.set_blocking(p.stdout.fileno(), False)
            while True:
                chunk = p.stdout.read()
                if chunk:
                    f.write(chunk)
                    f.flush()
                    if echo:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                if p.poll() is not None:
                    rest = p.stdout.read()
                    if rest:
                        f.write(rest)
                        if echo:
                            sys.stdout.write(rest.decode(errors="replace"))
                    break
                if time.time() > end:
                    self.stop_one("flwr_run")
                    raise TimeoutError(f"`flwr run` did not finish within {timeout:.0f} s; see {log_path}")
                time.sleep(0.2)
        return p.returncode

    # ---- stopping --------------------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process we started, with everything in its session (a crash, for fault tests)."""
        p = self.procs[name]
        if p.alive():
            try:
                os.killpg(p.popen.pid, sig)
            except ProcessLookupError:
                pass
            p.popen.wait(timeout=30)

    def stop_one(self, name: str, grace: float = 5.0) -> None:
        p = self.procs.get(name)
        if p is None or not p.alive():
            return
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait(timeout=10)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            if name in self.procs:
                self.stop_one(name)

    def __enter__(self) -> "LocalConsortium":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
