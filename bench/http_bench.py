"""Parts 2 and 3: HTTP throughput and latency, and server memory, for

  sgz        our service, `sgz serve --port P --checkpoint C` (micro-batching)
  naive      bench/naive_server.py: FastAPI, one enhance per request
  litserve   bench/litserve_server.py: LitServe with its batching

each started as its own process on this machine, one at a time, loaded by the same client
(bench/load_client.py, another process) with the same JPEGs, at each concurrency. The servers
run the same `load_model(checkpoint)` enhancer; only the serving around it differs. RSS is the
sum over the server's process tree (LitServe runs its model in worker processes), sampled every
0.1 s: idle once ready, and the peak while loaded.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

SERVERS = {
    "sgz": (["-m", "model.cli", "serve"], "/readyz"),
    "naive": (["-m", "bench.naive_server"], "/readyz"),
    "litserve": (["-m", "bench.litserve_server"], "/health"),
}
IMAGE_SETS = {"small": 512 * 512, "mixed": 1920 * 1080, "all": None}  # most pixels per photo
JPEG_QUALITY = 90


def write_jpegs(shared: Path, image_set: str, folder: Path) -> list[str]:
    """The shared photos (PNG) as JPEG files: what a camera or a browser would upload."""
    limit = IMAGE_SETS[image_set]
    names = []
    for f in sorted((shared / "data" / "sice-real").glob("*.png")):
        with Image.open(f) as im:
            if limit is not None and im.width * im.height > limit:
                continue
            im.convert("RGB").save(folder / f"{f.stem}.jpg", "JPEG", quality=JPEG_QUALITY)
            names.append(f"{f.stem} {im.width}x{im.height}")
    if not names:
        raise FileNotFoundError(f"no photos of the set {image_set!r} in {shared}/data/sice-real")
    return names


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


class ServerProcess:
    """One server (`kind` in SERVERS) as a subprocess on a free port, its output in
    `log_dir/KIND.log`; `env` is added to this process's environment."""

    def __init__(self, kind: str, checkpoint: str, log_dir: Path,
                 env: dict[str, str] | None = None):
        args, self.ready_path = SERVERS[kind]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{kind}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, *args, "--port", str(self.port), "--checkpoint", str(checkpoint)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[1],
                                     env={**os.environ, **(env or {})})

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the ready endpoint answered 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n"
                                   + self.log()[-3000:])
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


def load(url: str, images: Path, concurrency: int, duration: float) -> dict:
    cmd = [sys.executable, "-m", "bench.load_client", "--url", url, "--images", str(images),
           "--concurrency", str(concurrency), "--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[1], timeout=duration + 600)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def run_http_bench(checkpoint: str, shared: Path, servers, concurrencies, duration: float,
                   image_set: str, ready_timeout: float = 180, log=print) -> dict:
    results = {"image_set": image_set, "servers": []}
    with tempfile.TemporaryDirectory(prefix="sgz-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        results["images"] = write_jpegs(shared, image_set, tmp / "jpeg")
        for kind in servers:
            server = ServerProcess(kind, checkpoint, tmp)
            entry = {"server": kind, "levels": []}
            try:
                entry["startup_s"] = server.wait_ready(ready_timeout)
                time.sleep(1.0)  # let start-up garbage settle before the idle reading
                entry["rss_idle_mb"] = tree_rss(psutil.Process(server.proc.pid)) / 2 ** 20
                peak = 0
                for c in concurrencies:
                    with RssSampler(server.proc.pid) as rss:
                        level = load(server.url + "/enhance", tmp / "jpeg", c, duration)
                    peak = max(peak, rss.peak)
                    entry["levels"].append(level)
                    log(f"  {kind:8s} c={c:<3d} {level['throughput_rps']:7.1f} req/s  "
                        f"p50 {level['p50_ms']:7.0f}  p99 {level['p99_ms']:7.0f} ms  "
                        f"failed {level['failed']}")
                entry["rss_peak_mb"] = peak / 2 ** 20
            except (RuntimeError, TimeoutError) as e:
                entry["error"] = str(e)
                log(f"  {kind}: {e}")
            finally:
                server.stop()
            results["servers"].append(entry)
    return results
