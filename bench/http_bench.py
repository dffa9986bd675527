"""Parts 2 and 3: HTTP throughput and latency, and server memory, for

  sgz        our service, `sgz serve --port P --checkpoint C` (micro-batching)
  naive      bench/naive_server.py: FastAPI, one enhance per request
  litserve   bench/litserve_server.py: LitServe with its batching

each its own process on this machine, loaded by the same client (bench/load_client.py,
another process) with the same files: JPEG or PNG, answered in the same format, at fixed sizes or
the shared photos as they are (bench/http_cases.py, which also measures each case's coding
floor). The servers run the same `load_model(checkpoint)`
enhancer and the same image I/O functions; only the serving around them differs.

All servers are started first; while one is measured, the others are paused (SIGSTOP to their
whole process tree), so none takes CPU during another's turn (idle LitServe polls its queues:
~11% of a core here). Turns are interleaved: each of `rounds` rounds loads every server at
every concurrency, in alternating order, and each figure reported is the median over rounds;
ratios are medians of the per-round ratios. On a shared 2-core machine whose speed drifts,
that is what makes a ~10% difference measurable at all (one pass per server gave ratios that
flipped from run to run).

RSS is the sum over the server's process tree (LitServe runs its model in worker processes),
sampled every 0.1 s: idle once ready, and the peak while loaded.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .http_cases import Case, coding_floor, write_case
from .servers import ROOT, RssSampler, ServerGroup, ServerProcess, start_server, tree_rss


def write_jpegs(shared: Path, image_set: str, folder: Path) -> list[str]:
    """The shared photos (PNG) as JPEG files: what a camera or a browser would upload."""
    return write_case(shared, Case("jpeg", image_set), folder)


def load(
    url: str | list[str], images: Path, concurrency: int, duration: float, processes: int = 1
) -> dict:
    """bench/load_client.py against `url` (with any query string), in `processes` processes
    sharing the concurrency (one Python client tops out near a thousand requests a second)."""
    urls = [url] if isinstance(url, str) else url
    processes = max(1, len(urls), min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load_client",
                "--url",
                urls[i % len(urls)],
                "--images",
                str(images),
                "--concurrency",
                str(share),
                "--duration",
                str(duration),
                *(["--latencies"] if processes > 1 else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i, share in enumerate(shares)
    ]
    results = []
    for client in clients:
        out, err = client.communicate(timeout=duration + 600)
        if client.returncode != 0:
            raise RuntimeError(f"load client failed:\n{err[-3000:]}")
        results.append(json.loads(out))
    return results[0] if processes == 1 else merge_loads(concurrency, results)


def merge_loads(concurrency: int, results: list[dict]) -> dict:
    """One level from the load clients that ran it side by side: counts and rates summed,
    percentiles over every latency."""
    from .load_client import summary

    latencies = [s for r in results for s in r.pop("latencies_s")]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    merged = summary(concurrency, max(r["duration_s"] for r in results), latencies, statuses)
    merged["failed"] = sum(r["failed"] for r in results)
    merged["throughput_rps"] = sum(r["throughput_rps"] for r in results)
    merged["processes"] = len(results)
    return merged


def run_http_bench(
    checkpoint: str,
    shared: Path,
    servers,
    concurrencies,
    duration: float,
    cases: list[Case],
    rounds: int = 3,
    ready_timeout: float = 180,
    log=print,
    device: str = "cpu",
    query: str = "",
    load_processes: int = 1,
) -> dict:
    """Every case (format x photos) at every concurrency against every server, in `rounds`
    interleaved rounds; each case's coding floor measured here while the servers are paused."""
    from model import load_model

    results = {"rounds": rounds, "device": device, "query": query, "servers": [], "cases": []}
    with tempfile.TemporaryDirectory(prefix="sgz-bench-") as tmp:
        tmp = Path(tmp)
        enhancer = load_model(checkpoint, device=device)
        for i, case in enumerate(cases):
            folder = tmp / f"case{i}"
            entry = {
                "case": case.name,
                "images": write_case(shared, case, folder),
                "floor": coding_floor(folder, enhancer, query),
                "turns": {s: {c: [] for c in concurrencies} for s in servers},
            }
            results["cases"].append(entry)
            f = entry["floor"]
            log(
                f"  {case.name}: {len(entry['images'])} photos; coding floor decode "
                f"{f['decode_ms']:.1f} + encode {f['encode_ms']:.1f} ms on one core, model "
                f"{f['model_ms']:.1f} ms/image: at most {f['ceiling_rps']:.0f} images/s"
            )
        del enhancer
        running = _start(servers, checkpoint, tmp, device, ready_timeout, results, log, query)
        try:
            for r in range(rounds):
                pairs = ((ce, c) for ce in results["cases"] for c in concurrencies)
                for i, (ce, c) in enumerate(pairs):
                    order = results["servers"] if (r + i) % 2 == 0 else results["servers"][::-1]
                    folder = tmp / f"case{results['cases'].index(ce)}"
                    for entry in order:
                        if "error" not in entry:
                            _turn(
                                running[entry["server"]],
                                entry,
                                ce,
                                folder,
                                c,
                                duration,
                                f"round {r + 1}/{rounds} {ce['case']}",
                                log,
                                load_processes,
                            )
        finally:
            for server in running.values():
                server.resume()
                server.stop()
    for ce in results["cases"]:
        turns = ce.pop("turns")
        ce["servers"] = [
            {
                "server": e["server"],
                "levels": [summarise(c, turns[e["server"]][c]) for c in concurrencies],
            }
            for e in results["servers"]
            if "error" not in e
        ]
    for entry in results["servers"]:
        entry["rss_peak_mb"] = entry.pop("rss_peak") / 2**20
    return results


def _start(
    servers,
    checkpoint,
    tmp: Path,
    device: str,
    ready_timeout: float,
    results: dict,
    log,
    query: str,
) -> dict:
    """Every server started and ready, then paused; failures recorded in its entry."""
    running = {}
    for kind in servers:
        entry = {"server": kind, "rss_peak": 0}
        results["servers"].append(entry)
        # sgz serve reads the query from each request; the baselines are told it at start-up
        ours = kind.startswith("sgz")
        extra = ("--query", query) if not ours and query else ()
        try:
            server = start_server(kind, checkpoint, tmp, device=device, extra_args=extra)
        except RuntimeError as e:  # a revision that cannot be checked out
            entry["error"] = str(e)
            log(f"  {kind}: {e}")
            continue
        server.query = query if ours else ""
        running[kind] = server
        try:
            entry["startup_s"] = server.wait_ready(ready_timeout)
            time.sleep(1.0)  # let start-up garbage settle before the idle reading
            entry["rss_idle_mb"] = tree_rss(psutil.Process(server.proc.pid)) / 2**20
        except (RuntimeError, TimeoutError) as e:
            entry["error"] = str(e)
            log(f"  {kind}: {e}")
        server.pause()
    return running


def _turn(
    server: ServerProcess | ServerGroup,
    entry: dict,
    case: dict,
    images: Path,
    c: int,
    duration: float,
    label: str,
    log,
    load_processes: int = 1,
) -> None:
    """One server's turn at one case and concurrency: resumed, loaded, paused again."""
    server.resume()
    try:
        with RssSampler(server.proc.pid) as rss:
            query = f"?{server.query}" if server.query else ""
            urls = [u + "/enhance" + query for u in getattr(server, "urls", [server.url])]
            level = load(urls, images, c, duration, load_processes)
        entry["rss_peak"] = max(entry["rss_peak"], rss.peak)
        case["turns"][entry["server"]][c].append(level)
        log(
            f"  {label} {entry['server']:8s} c={c:<3d} {level['throughput_rps']:7.1f} req/s  "
            f"p50 {level['p50_ms']:7.0f}  p99 {level['p99_ms']:7.0f} ms  failed {level['failed']}"
        )
    except RuntimeError as e:
        entry["error"] = str(e)
        log(f"  {entry['server']}: {e}")
    finally:
        server.pause()


def summarise(c: int, turns: list[dict]) -> dict:
    """Medians over a server's rounds at one concurrency; counts summed; the rounds kept."""
    level = {
        "concurrency": c,
        "ok": sum(t["ok"] for t in turns),
        "failed": sum(t["failed"] for t in turns),
        "rounds": turns,
    }
    for key in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms"):
        level[key] = statistics.median(t[key] for t in turns)
    return level
