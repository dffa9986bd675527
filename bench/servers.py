"""The servers the HTTP benchmarks load, each its own process on a free port: our service (also
at another git revision, or as N processes), the naive endpoint and LitServe; pause/resume to
keep an idle one off the CPU, and the RSS of a process tree."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SERVERS = {
    "sgz": (["-m", "model.cli", "serve"], "/readyz"),
    "naive": (["-m", "bench.naive_server"], "/readyz"),
    "litserve": (["-m", "bench.litserve_server"], "/health"),
    "sgz-cpujpeg": (["-m", "model.cli", "serve"], "/readyz"),  # JPEG coded on the CPU
    "sgz-gpubatch": (["-m", "model.cli", "serve"], "/readyz"),  # GPU JPEG coding in batches
}
SERVER_ENV = {
    "sgz-cpujpeg": {"SGZ_JPEG_CODEC": "cpu"},
    "sgz-gpubatch": {"SGZ_JPEG_GPU_BATCH": "32"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that just exited
            pass
    return total


class RssSampler:
    """Peak RSS of a process tree, sampled in a thread while a `with` block runs."""

    def __init__(self, pid: int, every: float = 0.1):
        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.proc))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def checkout(rev: str, folder: Path) -> Path:
    """This repository at `rev` (a commit, tag or branch) as a detached git worktree."""
    r = subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(folder), rev],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"cannot check out {rev!r}: {r.stderr.strip()}")
    return folder


class ServerProcess:
    """One server (`kind` in SERVERS) as a subprocess on a free port, its output in
    `log_dir/KIND.log`; `env` is added to this process's environment. `sgz@REV` is our
    service as it was at git revision REV (before/after comparisons in one run)."""

    def __init__(
        self,
        kind: str,
        checkpoint: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        device: str = "cpu",
        extra_args: tuple[str, ...] = (),
    ):
        base, _, rev = kind.partition("@")
        args, self.ready_path = SERVERS[base]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{kind.replace('@', '-')}.log"
        self._log = open(self.log_path, "w")
        # `python -m` puts the working directory first on sys.path: the worktree's code runs
        self.tree = checkout(rev, Path(log_dir) / f"rev-{rev}") if rev else None
        cmd = [
            sys.executable,
            *args,
            "--port",
            str(self.port),
            "--checkpoint",
            str(checkpoint),
            "--device",
            device,
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.tree or ROOT,
            env={**os.environ, **SERVER_ENV.get(base, {}), **(env or {})},
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the ready endpoint answered 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; log:\n" + self.log()[-3000:]
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready after {timeout} s; log:\n" + self.log()[-3000:])

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM to the server; SIGKILL after `timeout` s. Returns its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def pause(self) -> None:
        """SIGSTOP the whole process tree (workers included)."""
        for p in self._tree():
            try:
                p.suspend()
            except psutil.Error:
                pass

    def resume(self) -> None:
        for p in reversed(self._tree()):  # workers first, then the one that talks to them
            try:
                p.resume()
            except psutil.Error:
                pass

    def stop(self) -> None:
        """Terminate the server, kill whatever of its worker processes is left, close the log."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.terminate()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        self._log.close()
        if self.tree is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(self.tree)],
                cwd=ROOT,
                capture_output=True,
            )


class ServerGroup:
    """`KIND*N`: N processes of one server, each on its own port, which the load clients share
    out between them (scale-out on one host, with no proxy in front). RSS: the first one's."""

    def __init__(self, servers: list[ServerProcess]):
        self.servers = servers
        self.proc, self.url, self.query = servers[0].proc, servers[0].url, ""

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def wait_ready(self, timeout: float) -> float:
        return max(s.wait_ready(timeout) for s in self.servers)

    def pause(self) -> None:
        for s in self.servers:
            s.pause()

    def resume(self) -> None:
        for s in self.servers:
            s.resume()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def start_server(kind: str, checkpoint, log_dir: Path, **kwargs) -> ServerProcess | ServerGroup:
    """`KIND` as one process, `KIND*N` as N of them."""
    base, _, n = kind.partition("*")
    if not n:
        return ServerProcess(kind, checkpoint, log_dir, **kwargs)
    folders = [Path(log_dir) / f"{base.replace('@', '-')}-{i}" for i in range(int(n))]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return ServerGroup([ServerProcess(base, checkpoint, f, **kwargs) for f in folders])
