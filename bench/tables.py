"""The tables `sgz bench` prints: the model step, HTTP (with each case's coding floor and
same-run ratios) and video, from the results it also writes as JSON."""

import statistics

PATHS = ("fast", "denoise", "torch", "eager", "published", "onnxruntime")
# fast, torch, eager: EFE + RIE alone (denoise=0, exposure=None), the paper's step, so that the
# baselines do the same work; denoise: the fast path as `enhance` runs by default (denoising,
# exposure "auto"); torch: the fused path's formulation in plain torch ops; onnxruntime: the
# exported ONNX graph under ONNX Runtime (informational, the onnx extra)


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])]
    )


def model_table(res: dict) -> str:
    by_cell = {}
    for r in res["rows"]:
        by_cell.setdefault((r["width"], r["height"], r["batch"]), {})[r["path"]] = r
    paths = [p for p in PATHS if any(p in c for c in by_cell.values())]
    floors = {(f["width"], f["height"]): f["floor_ms"] for f in res["floor"]["sizes"]}
    header = [
        "size",
        "batch",
        *[f"{p} ms/img (img/s)" for p in paths],
        *[f"{p}/fast" for p in paths if p != "fast"],
        "floor ms",
        "fast/floor",
    ]
    rows = []
    for (w, h, b), got in sorted(by_cell.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0][2])):
        row = [f"{w}x{h}", b]
        row += [
            f"{_ms(got[p]['ms_per_image'])} ({got[p]['images_per_s']:.0f})" if p in got else "-"
            for p in paths
        ]
        row += [
            _ratio(got[p]["ms_per_image"] / got["fast"]["ms_per_image"], p)
            if p in got and "fast" in got
            else "-"
            for p in paths
            if p != "fast"
        ]
        fl = floors[(w, h)]
        row += [_ms(fl), f"{got['fast']['ms_per_image'] / fl:.1f}x" if "fast" in got else "-"]
        rows.append(row)
    pk = res["floor"]["peaks"]
    f = next(
        (f for f in res["floor"]["sizes"] if (f["width"], f["height"]) == (1200, 900)),
        res["floor"]["sizes"][0],
    )
    note = (
        f"floor = max(FLOPs / measured matmul {pk['matmul_gflops']:.0f} GFLOP/s, bytes / "
        f"measured copy {pk['copy_gb_per_s']:.1f} GB/s); at {f['width']}x{f['height']}: "
        f"{f['flops'] / 1e6:.0f} MFLOP (2 per multiply-add), {f['bytes'] / 1e6:.1f} MB"
    )
    return table(header, rows) + "\n" + note


def _ms(ms: float) -> str:
    """Milliseconds with three significant figures below 1 ms (GPU cells), else one decimal."""
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.3g}"


def _ratio(x: float, path: str) -> str:
    """A path's time over the fast path's, as a factor: two decimals for denoise, else one."""
    return f"{x:.{2 if path == 'denoise' else 1}f}x"


def http_table(res: dict) -> str:
    """One table per case: each server's levels beside the case's coding floor."""
    header = [
        "case",
        "server",
        "concurrency",
        "req/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "ceiling img/s",
        "of ceiling",
    ]
    rows, ratios = [], []
    for ce in res["cases"]:
        ceiling = ce["floor"]["ceiling_rps"]
        for s in ce["servers"]:
            for lv in s["levels"]:
                rows.append(
                    [
                        ce["case"],
                        s["server"],
                        lv["concurrency"],
                        f"{lv['throughput_rps']:.1f}",
                        f"{lv['p50_ms']:.0f}",
                        f"{lv['p99_ms']:.0f}",
                        lv["failed"],
                        f"{ceiling:.0f}",
                        f"{lv['throughput_rps'] / ceiling:.0%}",
                    ]
                )
        ratios += _case_ratios(ce)
    f = "; ".join(
        f"{ce['case']} {ce['floor']['decode_ms']:.1f} + {ce['floor']['encode_ms']:.1f}"
        f" ms coding, {ce['floor']['model_ms']:.1f} ms model"
        for ce in res["cases"]
    )
    memory = ", ".join(
        f"{s['server']} {s['rss_idle_mb']:.0f} / {s['rss_peak_mb']:.0f}"
        for s in res["servers"]
        if "error" not in s
    )
    errors = [f"{s['server']}: error: {s['error'][:300]}" for s in res["servers"] if "error" in s]
    return "\n".join(
        [
            table(header, rows),
            *ratios,
            *errors,
            f"figures: medians over {res.get('rounds', 1)} interleaved rounds; "
            "ratios: median (each round's)",
            f"ceiling: images/s with nothing but decode + encode (per core) and the "
            f"model step (all cores): {f}",
            f"RSS idle / peak MB: {memory}",
        ]
    )


def _case_ratios(ce: dict) -> list[str]:
    ours = next((s for s in ce["servers"] if s["server"].startswith("sgz")), None)
    out = []
    for s in ce["servers"]:
        if ours is None or s is ours:
            continue
        for mine, theirs in zip(ours["levels"], s["levels"]):
            tput = round_ratios(mine, theirs, "throughput_rps")
            p99 = round_ratios(mine, theirs, "p99_ms")
            out.append(
                f"{ce['case']} c={mine['concurrency']}: {ours['server']}/{s['server']} throughput "
                f"{statistics.median(tput):.2f}x ({' '.join(f'{x:.2f}' for x in tput)}), "
                f"p99 {statistics.median(p99):.2f}x ({' '.join(f'{x:.2f}' for x in p99)})"
            )
    return out


def round_ratios(mine: dict, theirs: dict, key: str) -> list[float]:
    """Ours over theirs, round by round (turns of the same round ran minutes apart at most)."""
    return [a[key] / max(b[key], 1e-9) for a, b in zip(mine["rounds"], theirs["rounds"])]


def video_table(res: dict) -> str:
    header = [
        "size",
        "path",
        "frames",
        "fps",
        "wall s",
        "decode s",
        "model s",
        "encode s",
        "MB out",
        "x transcode",
        "vs loop",
    ]
    rows = [
        [
            f"{r['width']}x{r['height']}",
            r["path"],
            r["frames"],
            f"{r['fps']:.1f}",
            f"{r['seconds']:.2f}",
            f"{r['decode_s']:.2f}",
            f"{r['model_s']:.2f}" if "transcode" not in r["path"] else "-",
            f"{r['encode_s']:.2f}",
            f"{r['out_bytes'] / 1e6:.1f}",
            f"{r['x_transcode']:.2f}x",
            f"{r['speedup_vs_loop']:.2f}x",
        ]
        for r in res["rows"]
    ]
    enc = res["encoder"]
    notes = [
        f"wall: median of {res['rounds']} runs per path (alternating); decode/model/encode:"
        " busy seconds of each stage (the pipeline's threads overlap; the loop's add up)",
        "x transcode: wall over the plain transcode's in the same round; vs loop: the serial"
        " image loop's wall over this path's (medians of the rounds' ratios)",
        "transcode-out: the same transcode of the temporal path's output (the clean picture"
        " it encodes; the dark input's noise costs x264 several times as much)",
        f"encoder: {enc['codec']} crf {enc['crf']} preset {enc['preset']}; clips: "
        f"{res['clip']['frames']} frames at {res['clip']['fps']} fps, a dark pan over "
        f"sice-real/{res['clip']['photo']} (bench/video_clips.py)",
    ]

    def each(xs):
        return " ".join(f"{x:.2f}" for x in xs)

    for r in res["rows"]:
        if r["path"] != "temporal":
            continue
        line = (
            f"temporal at {r['width']}x{r['height']}: {r['x_transcode']:.2f}x transcode "
            f"({each(r['x_transcode_rounds'])}), {r['x_transcode_out']:.2f}x "
            f"transcode-out ({each(r['x_transcode_out_rounds'])})"
        )
        if (r["width"], r["height"]) == (1280, 720):
            met = "met" if r["x_transcode"] <= 1.5 else "NOT met"
            line += f"; criterion <= 1.5x transcode: {met}"
        notes.append(line)
    return table(header, rows) + "\n" + "\n".join(notes)
