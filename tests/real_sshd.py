"""A real OpenSSH server for tests: ``sshd`` on 127.0.0.1, a free non-default port, its own config,
throwaway ed25519 host and client keys in a temporary directory, the current user only.

:class:`SshServer` starts it (optionally with an address-space limit, ``ulimit -v``, inherited by
every remote command, or with a tiny tmpfs mounted in its own mount namespace as the "device disk"),
writes ``ssh`` / ``scp`` wrappers that add ``-F <its ssh_config>`` (identity, known_hosts with the
host key, strict host key checking) for ``$TASA_SSH`` / ``$TASA_SCP``, and stops it.
:func:`missing` says why it cannot run here (no sshd / ssh client), for ``pytest.skip``.
"""

from __future__ import annotations

import getpass
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD_CANDIDATES = ("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
INSTALL_HINT = "apt-get install openssh-server openssh-client"


def sshd_path() -> str | None:
    for c in SSHD_CANDIDATES:
        p = shutil.which(c)
        if p:
            return p
    return None


def missing() -> str | None:
    """Why a real sshd cannot be started here, or None."""
    if sshd_path() is None:
        return f"OpenSSH server (sshd) not installed ({INSTALL_HINT})"
    for t in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(t) is None:
            return f"OpenSSH client tool {t} not installed ({INSTALL_HINT})"
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:  # sshd run as root wants its privilege-separation directory (the Debian service makes it)
            Path("/run/sshd").mkdir(mode=0o755)
        except OSError as exc:
            return f"cannot create /run/sshd for sshd: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tasa-edge-test", "-f", str(path)],
                   check=True, capture_output=True)


class SshServer:
    """``with SshServer(tmp) as srv: ...`` -- ``srv.host`` is ``USER@127.0.0.1:PORT``; ``srv.env``
    the ``TASA_SSH`` / ``TASA_SCP`` variables for the harness."""

    def __init__(self, root: Path, *, limit_as_bytes: int | None = None,
                 tmpfs: tuple[Path, int] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit_as_bytes = limit_as_bytes
        self.tmpfs = tmpfs  # (mount point, bytes): a tmpfs only the server's sessions see
        self.user = getpass.getuser()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "sshd.log"

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"TASA_SSH": str(self.root / "ssh"), "TASA_SCP": str(self.root / "scp")}

    def _write_config(self) -> Path:
        r = self.root
        _keygen(r / "host_ed25519")
        _keygen(r / "client_ed25519")
        (r / "authorized_keys").write_text((r / "client_ed25519.pub").read_text())
        (r / "authorized_keys").chmod(0o600)
        cfg = r / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {r / 'host_ed25519'}",
            f"PidFile {r / 'sshd.pid'}", f"AuthorizedKeysFile {r / 'authorized_keys'}",
            f"AllowUsers {self.user}", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no",  # the keys live in a pytest temp dir, not in a 0700 ~/.ssh
            "PermitRootLogin prohibit-password",  # CI runs as root: key login only
            "Subsystem sftp internal-sftp",  # OpenSSH >= 9 scp speaks SFTP
            "LogLevel VERBOSE", "",
        ]))
        host_pub = (r / "host_ed25519.pub").read_text().split()
        (r / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        client = r / "ssh_config"
        client.write_text("\n".join([
            "Host 127.0.0.1", f"  IdentityFile {r / 'client_ed25519'}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {r / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  GlobalKnownHostsFile /dev/null", "  LogLevel ERROR", "",
        ]))
        for tool in ("ssh", "scp"):
            w = r / tool
            w.write_text(f'#!/bin/sh\nexec {shutil.which(tool)} -F {client} "$@"\n')
            w.chmod(0o755)
        return cfg

    def start(self) -> "SshServer":
        cfg = self._write_config()
        argv = [sshd_path(), "-D", "-e", "-f", str(cfg)]
        if self.tmpfs is not None:
            mnt, size = self.tmpfs
            Path(mnt).mkdir(parents=True, exist_ok=True)
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    f'mount -t tmpfs -o size={size} tasa-tiny-disk "$0" && exec "$@"', str(mnt)] + argv
        limit = self.limit_as_bytes

        def pre():
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=pre, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "SshServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
