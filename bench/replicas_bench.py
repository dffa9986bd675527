"""Throughput through nginx with 1 vs 2 `sgz serve` replicas on this machine, sharing Redis:
the topology of docker-compose.replicas.yml without Docker (docs/scaling.md).

    python -m bench.replicas_bench --checkpoint ../shared/peers/sgz-published.pth \
        --concurrency 16 --duration 15 --rounds 2

Both replicas and two nginx (one with replica A only, one with A and B) start first; turns
alternate, and during the 1-replica turn replica B is paused (SIGSTOP), so that it takes no CPU.
The load comes from bench/load_client.py. Each figure is the median over rounds, the ratio the
median of the rounds' ratios (the two turns of a round run back to back). On a host
with fewer cores than replicas x their threads, the replicas share the same cores: the ratio
then shows what a second process adds on the same hardware (batching spread thinner, more
threads), not what a second machine would.

Also the helpers tests/test_scaleout.py uses: RedisServer and Nginx as processes on free ports,
and `render_nginx`, which fills deploy/nginx/nginx.conf.template as the compose file's nginx does.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import string
import subprocess
import tempfile
import time
from pathlib import Path

from .http_bench import load, write_jpegs
from .servers import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"


def binary(name: str) -> str | None:
    """A Debian binary's path: PATH, else /usr/sbin (nginx lives there, off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def render_nginx(upstreams: list[str], port: int, run_dir: Path, **extra: str) -> str:
    """The template with ${NAME} filled in, nginx's own $variables untouched (as envsubst does
    when only these names are defined). Video jobs go to the first upstream."""
    from service.settings import Settings

    defaults = Settings.model_construct()
    values = {
        "NGINX_PORT": str(port),
        "NGINX_RESOLVER": "127.0.0.1",
        "NGINX_RUN_DIR": str(run_dir),
        "NGINX_ACCESS_LOG": str(run_dir / "access.log"),
        "NGINX_ERROR_LOG": str(run_dir / "error.log"),
        "SGZ_UPSTREAM_SERVERS": " ".join(
            f"server {u} max_fails=3 fail_timeout=2s;" for u in upstreams
        ),
        "SGZ_JOBS_UPSTREAM_SERVERS": f"server {upstreams[0]};",
        "SGZ_MAX_UPLOAD_BYTES": str(defaults.max_upload_bytes),
        "SGZ_MAX_VIDEO_UPLOAD_BYTES": str(defaults.max_video_upload_bytes),
        **extra,
    }
    text = string.Template(NGINX_TEMPLATE.read_text()).safe_substitute(values)
    left = re.findall(r"\$\{([A-Z_]+)\}", text)
    if left:  # a placeholder the template gained: the compose file must define it too
        raise KeyError(f"nginx template placeholders without a value: {left}")
    return text


def wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on {port} after {timeout} s")


class RedisServer:
    """Debian's redis-server on a free port, no persistence; `stop` and `start` keep the port."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="sgz-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                binary("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "volatile-ttl",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, 10, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class Nginx:
    """Debian's nginx on a free port in front of `upstreams` (host:port), its pid, logs and
    temporary files in a folder of its own (-p prefix, -e error log): no root, no /var."""

    def __init__(self, upstreams: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="sgz-nginx-"))
        self.dir.chmod(0o755)  # as root, the workers run as nobody and buffer bodies in here
        conf = self.dir / "nginx.conf"
        conf.write_text(render_nginx(upstreams, self.port, self.dir))
        cmd = [
            binary("nginx"),
            "-p",
            str(self.dir),
            "-c",
            str(conf),
            "-e",
            str(self.dir / "error.log"),
            "-g",
            "daemon off;",
        ]
        check = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the rendered config:\n{check.stderr}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, 10, self.proc, "nginx")

    def log(self, name: str = "access.log") -> str:
        path = self.dir / name
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(
    checkpoint: str,
    shared: Path,
    concurrency: int,
    duration: float,
    rounds: int,
    image_set: str,
    log=print,
) -> dict:
    runs: dict[str, list[dict]] = {"1": [], "2": []}
    with tempfile.TemporaryDirectory(prefix="sgz-replicas-") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        write_jpegs(shared, image_set, tmp / "jpeg")
        redis = RedisServer()
        env = {"SGZ_REDIS_URL": redis.url}
        replicas, fronts = [], {}
        try:
            for i in range(2):
                (tmp / f"replica-{i}").mkdir()
                replicas.append(ServerProcess("sgz", checkpoint, tmp / f"replica-{i}", env=env))
            for r in replicas:
                r.wait_ready(300)
            fronts = {
                "1": Nginx([f"127.0.0.1:{replicas[0].port}"]),
                "2": Nginx([f"127.0.0.1:{r.port}" for r in replicas]),
            }
            for round_ in range(rounds):
                for n in ("1", "2") if round_ % 2 == 0 else ("2", "1"):
                    (replicas[1].pause if n == "1" else replicas[1].resume)()
                    result = load(fronts[n].url + "/enhance", tmp / "jpeg", concurrency, duration)
                    log(
                        f"round {round_ + 1}, {n} replica(s): {result['throughput_rps']:.2f} "
                        f"req/s, p99 {result['p99_ms']:.0f} ms, statuses {result['statuses']}"
                    )
                    runs[n].append(result)
        finally:
            if len(replicas) == 2:
                replicas[1].resume()
            for front in fronts.values():
                front.close()
            for r in replicas:
                r.stop()
            redis.close()
    summary = {
        n: {
            "rps": statistics.median(r["throughput_rps"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "failed": sum(r["failed"] for r in rs),
        }
        for n, rs in runs.items()
    }
    # the two turns of a round are back to back: their ratio is the least disturbed by a
    # host whose other load drifts, so the ratio reported is the median of the rounds' ratios
    ratios = [
        two["throughput_rps"] / one["throughput_rps"] for one, two in zip(runs["1"], runs["2"])
    ]
    summary["ratio_rps"], summary["round_ratios"] = statistics.median(ratios), ratios
    summary["loadavg_1min"] = os.getloadavg()[0]  # of the whole host, at the end
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "rounds": rounds,
        "image_set": image_set,
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shared", default="../shared", help="folder with data/sice-real")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", default="small", choices=["small", "mixed", "all"])
    args = p.parse_args()
    for name in ("redis-server", "nginx"):
        if binary(name) is None:
            raise SystemExit(f"replicas_bench: no {name} (apt-get install redis-server nginx)")
    result = run(
        args.checkpoint,
        Path(args.shared),
        args.concurrency,
        args.duration,
        args.rounds,
        args.images,
    )
    s = result["summary"]
    print(f"1 replica : {s['1']['rps']:.2f} req/s, p99 {s['1']['p99_ms']:.0f} ms")
    print(f"2 replicas: {s['2']['rps']:.2f} req/s, p99 {s['2']['p99_ms']:.0f} ms")
    print(
        f"ratio 2/1 : {s['ratio_rps']:.2f}x (median of the rounds' "
        f"{', '.join(f'{r:.2f}' for r in s['round_ratios'])}); host load average "
        f"{s['loadavg_1min']:.1f} on {os.cpu_count()} cores"
    )
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
