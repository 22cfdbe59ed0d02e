"""Start and stop Azurite (npm, pinned in tools/package.json) on loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft): not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STANDARD_PORTS = (10000, 10001, 10002)
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def azurite_binary() -> str:
    candidates = [os.environ.get("AZURITE_BIN", ""), str(REPO / "tools/node_modules/.bin/azurite")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("azurite")
    if found:
        return found
    raise RuntimeError("Azurite is not installed: run `make tools` (npm install in tools/)")


class Azurite:
    """One Azurite process (blob, queue, table) with in-memory storage."""

    def __init__(self, ports: tuple[int, int, int] | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.blob_port, self.queue_port, self.table_port = ports or (free_port(), free_port(), free_port())
        self._process: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def connection_string(self) -> str:
        base = f"http://{self.host}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={base}:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={base}:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint={base}:{self.table_port}/{ACCOUNT};"
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> Azurite:
        command = [
            azurite_binary(),
            "--blobHost", self.host, "--blobPort", str(self.blob_port),
            "--queueHost", self.host, "--queuePort", str(self.queue_port),
            "--tableHost", self.host, "--tablePort", str(self.table_port),
            "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        """Read Azurite's output until all three services say they listen (or it dies)."""
        assert self._process is not None and self._process.stdout is not None
        ready = threading.Event()
        stdout = self._process.stdout

        def pump() -> None:
            for line in stdout:
                self.output.append(line.rstrip())
                if sum("successfully listening" in seen for seen in self.output) >= 3:
                    ready.set()

        threading.Thread(target=pump, name="azurite-output", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Azurite did not start:\n" + "\n".join(self.output[-20:]))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, sig)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)

    def kill(self) -> None:
        """Die at once, as a crashed state store would."""
        self.stop(signal.SIGKILL)
