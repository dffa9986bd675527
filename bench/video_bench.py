"""Part 5: video files, H.264 in and out, four ways through the same dark clip (video_clips):

  transcode  `model.video.transcode`: the pipeline's decode -> encode with no model, the floor
  transcode-out  the same, of the temporal path's own output (made once, untimed, before the
             rounds): x264's work depends on the picture, and the dark clip's noise costs it
             several times what the denoised output does, so this is the floor for encoding what
             the temporal path encodes; temporal / transcode-out is the model's own cost
  temporal   `enhance_video(..., temporal=True)`: the product's default path
  frames     `enhance_video(..., temporal=False)`: each frame on its own, through the pipeline
  loop       what a user writes without our pipeline: decode a frame with PyAV, `enhance` it,
             encode it, one after the other in one thread (same decoder threads, same encoder
             and settings, channels-last tensors straight from `to_ndarray`: its best shot)

Each path runs in its own process (as in model_bench: thread pools of one path must not
disturb the next), once per round, the order rotating from round to round; each process first
runs its path untimed over a short clip of the same size (numba's cache, x264's start-up, the
allocator). Figures are medians over the rounds; ratios are taken within each round.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PATHS = ("transcode", "transcode-out", "temporal", "frames", "loop")
WARM_FRAMES = 8  # the untimed warm-up clip: two batches of the pipeline


def run_video_bench(
    checkpoint: str,
    shared: Path,
    sizes,
    frames: int,
    rounds: int = 3,
    log=print,
    device: str = "cpu",
) -> dict:
    from model.video import EncoderOptions

    from .video_clips import LEVEL, PHOTO, bench_clip

    clips = {}
    for w, h in sizes:
        start = time.perf_counter()
        clips[w, h] = (bench_clip(w, h, frames, shared), bench_clip(w, h, WARM_FRAMES, shared))
        log(
            f"  clip {w}x{h}, {frames} frames: {clips[w, h][0]} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    with tempfile.TemporaryDirectory(prefix="sgz-video-bench-") as kept:
        _time_in_child("temporal", checkpoint, clips, device, keep=kept)
        enhanced = {
            (w, h): (Path(kept) / f"{w}x{h}.mp4", warm) for (w, h), (_, warm) in clips.items()
        }
        runs: dict[tuple, list[dict]] = {}
        for r in range(rounds):
            for name in PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]:
                src = enhanced if name == "transcode-out" else clips
                for cell in _time_in_child(name, checkpoint, src, device):
                    runs.setdefault((name, cell["width"], cell["height"]), []).append(cell)
            log(f"  round {r + 1}/{rounds} done")
    rows = []
    for w, h in sizes:
        base, loop = runs["transcode", w, h], runs["loop", w, h]
        out_base = runs["transcode-out", w, h]
        for name in PATHS:
            got = runs[name, w, h]
            med = {
                k: statistics.median(c[k] for c in got)
                for k in ("seconds", "decode_s", "model_s", "encode_s", "out_bytes")
            }
            x = [c["seconds"] / b["seconds"] for c, b in zip(got, base)]
            x_out = [c["seconds"] / b["seconds"] for c, b in zip(got, out_base)]
            vs_loop = [lp["seconds"] / c["seconds"] for c, lp in zip(got, loop)]
            rows.append(
                {
                    "path": name,
                    "width": w,
                    "height": h,
                    "frames": got[0]["frames"],
                    **med,
                    "fps": got[0]["frames"] / med["seconds"],
                    "min_seconds": min(c["seconds"] for c in got),
                    "x_transcode": statistics.median(x),
                    "x_transcode_rounds": x,
                    "x_transcode_out": statistics.median(x_out),
                    "x_transcode_out_rounds": x_out,
                    "speedup_vs_loop": statistics.median(vs_loop),
                    "speedup_vs_loop_rounds": vs_loop,
                    "scene_cuts": got[0].get("scene_cuts"),
                    "rounds": got,
                }
            )
        log(
            f"  {w}x{h}: "
            + ", ".join(f"{r['path']} {r['fps']:.1f} fps" for r in rows[-len(PATHS) :])
        )
    enc = EncoderOptions()
    return {
        "rows": rows,
        "rounds": rounds,
        "device": device,
        "encoder": {"codec": enc.codec, "crf": enc.crf, "preset": enc.preset},
        "clip": {
            "frames": frames,
            "fps": 30,
            "photo": PHOTO,
            "level": LEVEL,
            "codec": "h264 yuv420p",
            "crf": 18,
        },
    }


def _time_in_child(
    name: str, checkpoint: str, clips: dict, device: str, keep: str | None = None
) -> list[dict]:
    spec = json.dumps([[w, h, str(main), str(warm)] for (w, h), (main, warm) in clips.items()])
    cmd = [
        sys.executable,
        "-m",
        "bench.video_bench",
        "--path",
        name,
        "--checkpoint",
        str(checkpoint),
        "--device",
        device,
        "--threads",
        str(torch.get_num_threads()),
        "--clips",
        spec,
        *(["--keep", keep] if keep else []),
    ]
    root = Path(__file__).resolve().parent.parent  # so `-m bench...` imports this checkout
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"video bench of {name!r} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def image_loop(enhancer, src, dst, encoder) -> dict:
    """The serial loop a user would write with PyAV and `Enhancer.enhance`, stage times kept
    like the pipeline's (here they add up to the wall time: nothing overlaps)."""
    import av

    from model.videoio import CODECS

    start = time.perf_counter()
    busy = {"decode_s": 0.0, "model_s": 0.0, "encode_s": 0.0}
    n = 0
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vs = inp.streams.video[0]
        vs.thread_type = "AUTO"  # FFmpeg's frame threads, as the pipeline decodes
        st = out.add_stream(
            CODECS[encoder.codec][0], rate=vs.average_rate, options=encoder.stream_options()
        )
        st.width, st.height, st.pix_fmt = vs.codec_context.width, vs.codec_context.height, "yuv420p"
        st.time_base = st.codec_context.time_base = vs.time_base
        frames = inp.decode(vs)
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            rgb = frame.to_ndarray(format="rgb24")
            t1 = time.perf_counter()
            x = torch.from_numpy(rgb)[None].permute(0, 3, 1, 2)  # channels-last view
            y = enhancer.enhance(x).permute(0, 2, 3, 1)[0].cpu().numpy()
            t2 = time.perf_counter()
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(y), format="rgb24")
            f.pts, f.time_base = frame.pts, vs.time_base
            out.mux(st.encode(f))
            busy["decode_s"] += t1 - t0
            busy["model_s"] += t2 - t1
            busy["encode_s"] += time.perf_counter() - t2
            n += 1
        t0 = time.perf_counter()
        out.mux(st.encode(None))
        busy["encode_s"] += time.perf_counter() - t0
    return {"frames": n, "seconds": time.perf_counter() - start, **busy}


def run_path(name: str, src, dst, enhancer=None) -> dict:
    """One path over one clip, in this process: frames, wall and busy seconds, bytes out."""
    from model.video import EncoderOptions, enhance_video, transcode

    enc = EncoderOptions()  # h264, crf 18, medium: the product's default
    if name.startswith("transcode"):
        s = transcode(src, dst, encoder=enc)
    elif name == "loop":
        got = image_loop(enhancer, src, dst, enc)
        return {**got, "out_bytes": Path(dst).stat().st_size}
    else:
        s = enhance_video(enhancer, src, dst, temporal=name == "temporal", encoder=enc)
    return {
        "frames": s.frames,
        "seconds": s.seconds,
        "decode_s": s.decode_s,
        "model_s": s.model_s,
        "encode_s": s.encode_s,
        "scene_cuts": s.scene_cuts,
        "out_bytes": Path(dst).stat().st_size,
    }


def main() -> None:
    """The child process of run_video_bench: times one path on each clip, prints JSON."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--path", required=True, choices=PATHS)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--clips", required=True, help="JSON: [[W, H, clip, warm-up clip], ...]")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", help="copy each output here as WxH.mp4")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    enhancer = None
    if not a.path.startswith("transcode"):
        from model import load_model

        enhancer = load_model(a.checkpoint, device=a.device)
        enhancer.warmup()
    out = []
    with tempfile.TemporaryDirectory(prefix="sgz-video-bench-") as tmp:
        for w, h, clip, warm in json.loads(a.clips):
            run_path(a.path, warm, Path(tmp) / "warm.mp4", enhancer)
            out.append(
                {"width": w, "height": h, **run_path(a.path, clip, Path(tmp) / "out.mp4", enhancer)}
            )
            if a.keep:
                shutil.copyfile(Path(tmp) / "out.mp4", Path(a.keep) / f"{w}x{h}.mp4")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
