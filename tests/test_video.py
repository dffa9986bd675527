"""Video: the streaming pipeline on real files (made here with PyAV, and the shared dev clip),
temporal stability measured the standard way, bad inputs, cancel, the frame iterator API and
the numba kernels against their torch references."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import DATA
from video_files import make_video, read_video

from model import load_model
from model.temporal import TemporalConfig, TemporalState
from model.video import (
    Cancelled,
    EncoderOptions,
    VideoEnhancer,
    VideoError,
    enhance_frames,
    enhance_video,
    probe,
    transcode,
)

DEV = DATA / "video"


@pytest.fixture(scope="module")
def enhancer():
    return load_model(device="cpu")


def test_frames_size_rate_timestamps_rotation_and_audio_are_kept(enhancer, tmp_path):
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    stamps = make_video(src, frames=23, audio=True, durations_ms=(40, 40, 100), rotation=90)
    stats = enhance_video(enhancer, src, dst)
    back, before = read_video(dst), read_video(src)
    assert stats.frames == 23 and back.frames.shape == (23, 64, 96, 3)
    assert back.stamps == pytest.approx(stamps, abs=1e-3)  # variable frame rate kept
    assert back.rotation == before.rotation == 90
    assert back.audio_packets == before.audio_packets > 0
    assert back.codec == "h264" and back.pix_fmt == "yuv420p"
    assert back.frames.mean() > before.frames.mean() + 20  # brighter: the model ran
    assert list(tmp_path.iterdir()) == [src, dst] or set(tmp_path.iterdir()) == {src, dst}


def test_matroska_odd_sizes_and_other_codecs(enhancer, tmp_path):
    src = tmp_path / "odd.mkv"
    make_video(src, width=97, height=65, frames=9, pix_fmt="yuv444p")
    for codec, name in (("h264", "a.mkv"), ("vp9", "b.webm")):
        enhance_video(
            enhancer, src, tmp_path / name, encoder=EncoderOptions(codec, 30, "ultrafast")
        )
        back = read_video(tmp_path / name)
        assert back.frames.shape == (9, 65, 97, 3)


def test_ten_bit_sdr_is_enhanced_as_eight_bit_and_hdr_is_refused(enhancer, tmp_path):
    src = tmp_path / "ten.mp4"
    make_video(src, frames=6, pix_fmt="yuv420p10le")
    assert probe(src).bit_depth == 10
    enhance_video(enhancer, src, tmp_path / "out.mp4")
    assert read_video(tmp_path / "out.mp4").pix_fmt == "yuv420p"
    hdr = tmp_path / "hdr.mp4"
    make_video(hdr, frames=4, pix_fmt="yuv420p10le", transfer=16)  # PQ
    with pytest.raises(VideoError, match="HDR"):
        enhance_video(enhancer, hdr, tmp_path / "hdr-out.mp4")
    assert not (tmp_path / "hdr-out.mp4").exists()


def bad_inputs(tmp_path):
    good = tmp_path / "good.mkv"
    make_video(good, frames=60, audio=True)
    data = good.read_bytes()
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 3000 : 7] = bytes(429)
    (tmp_path / "corrupt.mkv").write_bytes(bytes(corrupt))
    (tmp_path / "still.mp4").write_bytes((DATA / "sice-real" / "435_0_.png").read_bytes())
    (tmp_path / "notes.txt").write_text("lux readings\n" * 40)  # FFmpeg's tty demuxer takes it
    return {
        "junk.mp4": "not a video",
        "cut.mkv": "truncated or corrupt",
        "corrupt.mkv": "truncated or corrupt",
        "still.mp4": "still image",
        "missing.mp4": "no such file",
        "notes.txt": "text",
    }


def test_bad_inputs_get_a_clear_error_and_leave_no_file(enhancer, tmp_path):
    (tmp_path / "out").mkdir()
    for name, message in bad_inputs(tmp_path).items():
        with pytest.raises(VideoError, match=message):
            enhance_video(enhancer, tmp_path / name, tmp_path / "out" / f"{name}.mp4")
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(VideoError, match="no such folder"):
        enhance_video(enhancer, tmp_path / "good.mkv", tmp_path / "nowhere" / "out.mp4")
    import av

    with av.open(str(tmp_path / "audio.m4a"), "w") as c:  # audio only
        a = c.add_stream("aac", rate=48000)
        a.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 48000
        c.mux(a.encode(frame))
        c.mux(a.encode(None))
    with pytest.raises(VideoError, match="no video stream"):
        probe(tmp_path / "audio.m4a")
    with pytest.raises(ValueError, match="crf"):
        EncoderOptions(crf=70)


def test_cancel_stops_and_leaves_nothing(enhancer, tmp_path):
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_video(src, frames=60)
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        cancel.set()

    with pytest.raises(Cancelled):
        enhance_video(enhancer, src, dst, progress=progress, cancel=cancel)
    assert seen[0] == (4, 60) and not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_frame_iterator_keeps_state_and_frame_by_frame_is_the_image_path(enhancer):
    frames = read_video(DEV / "bbb-dark.mp4").frames[:12]
    lazy = enhance_frames(enhancer, iter(frames), batch=5)
    out = np.stack(list(lazy))
    assert out.shape == frames.shape
    plain = np.stack(list(enhance_frames(enhancer, iter(frames), temporal=False)))
    image = enhancer.enhance(torch.from_numpy(frames[3]).permute(2, 0, 1)[None])
    assert np.array_equal(plain[3], image[0].permute(1, 2, 0).numpy())
    # state carries over between calls: two halves through one VideoEnhancer = one stream
    video = VideoEnhancer(enhancer)
    halves = [
        video.process(torch.from_numpy(f).permute(0, 3, 1, 2)) for f in (frames[:6], frames[6:])
    ]
    again = torch.cat(halves).permute(0, 2, 3, 1).numpy()
    one = np.stack(list(enhance_frames(enhancer, iter(frames), batch=6)))
    assert np.array_equal(again, one)
    assert not np.array_equal(one, plain)  # temporal mode did something


def test_dev_clip_temporal_mode_halves_the_warping_error(enhancer, tmp_path):
    """The issue's criterion on ../shared/data/video: warping error at most half of frame by
    frame's, PSNR and SSIM not lower."""
    from bench.video_quality import Flow, read_frames

    src = DEV / "bbb-dark.mp4"
    info = probe(src)
    flow = Flow(read_frames(DEV / "bbb-gt.mp4"))
    scores = {}
    for temporal in (False, True):
        dst = tmp_path / f"{temporal}.mp4"
        stats = enhance_video(enhancer, src, dst, temporal=temporal)
        back = read_video(dst)
        assert stats.frames == len(back.frames) == info.frames == 132
        assert back.fps == info.fps == 25
        scores[temporal] = flow.score(back.frames)
    assert scores[True]["warp"] <= 0.5 * scores[False]["warp"]
    assert scores[True]["psnr"] >= scores[False]["psnr"]
    assert scores[True]["ssim"] >= scores[False]["ssim"]


def test_scene_cuts_restart_the_state(enhancer):
    """The dev clip cut into itself 60 frames later and into a pan over a real photo."""
    from bench.video_clips import clean_frames, darken

    dev = read_video(DEV / "bbb-dark.mp4").frames
    rng = np.random.default_rng(0)
    pan = np.stack([darken(f, t, rng) for t, f in enumerate(clean_frames(640, 360, 20))])
    clip = np.concatenate([dev[:30], pan, dev[90:110]])
    video = VideoEnhancer(enhancer)
    cuts = []
    for i, _ in enumerate(video.frames(iter(clip), batch=1)):
        if video.scene_cuts > len(cuts):
            cuts.append(i)
    assert cuts == [30, 50]


def test_exposure_follows_the_scene_not_the_camera_pumping(enhancer):
    """A static scene whose exposure pumps by +-25%: with the model's own level, frame by
    frame output brightness follows the pumping; temporal mode holds it steadier."""
    base = read_video(DEV / "bbb-dark.mp4").frames[0].astype(np.float32)
    gains = 1 + 0.25 * np.sin(2 * np.pi * np.arange(30) / 10)
    clip = [np.clip(base * g, 0, 255).astype(np.uint8) for g in gains]
    means = {}
    for temporal in (False, True):
        out = enhance_frames(enhancer, iter(clip), temporal=temporal, exposure=None, denoise=0)
        means[temporal] = np.array([f.mean() for f in out])[10:]
    assert means[True].std() < 0.5 * means[False].std()


def test_numba_filter_and_noise_match_their_torch_references(enhancer):
    from model.denoise import noise_sigma

    if enhancer.backend != "numba":
        pytest.skip("numba not installed")
    frames = torch.from_numpy(read_video(DEV / "bbb-dark.mp4").frames[:8]).permute(0, 3, 1, 2)
    assert np.allclose(
        enhancer.engine.frame_noise(frames, 4, 0.25),
        noise_sigma(frames, 4, 0.25).numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    out = enhancer.enhance(frames)
    eager = load_model(device="cpu", backend="eager")  # the torch reference filter
    fast, ref = (TemporalState(e, TemporalConfig()) for e in (enhancer, eager))
    k = np.array([20.0], np.float32)
    ref_out = [ref._filter(o[None], k)[0] for o in out]
    fast_out = [fast._filter(o[None], k)[0] for o in out]
    for a, b in zip(fast_out, ref_out):
        assert (a.int() - b.int()).abs().max() <= 1
    assert not torch.equal(fast_out[-1], out[-1])


def test_transcode_is_the_same_pipeline_without_the_model(tmp_path):
    src = tmp_path / "in.mp4"
    make_video(src, frames=10, audio=True)
    stats = transcode(src, tmp_path / "out.mp4")
    back = read_video(tmp_path / "out.mp4")
    assert stats.frames == 10 and stats.model_s == 0 and back.audio_packets > 0


def test_cli_enhances_videos_beside_images_and_reports_bad_ones(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    make_video(folder / "clip.mov", frames=8, audio=True)
    make_video(folder / "clip.mkv", frames=3)  # same stem: both keep their suffix
    make_video(tmp_path / "v.mp4", frames=5)
    (tmp_path / "v.mp4").rename(folder / "named-wrong.jpg")  # recognised by content
    (folder / "broken.mp4").write_bytes(b"\x00" * 4000)
    (folder / "photo.png").write_bytes((DATA / "sice-real" / "435_0_.png").read_bytes())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.cli",
            "enhance",
            str(folder),
            "-o",
            str(out),
            "--crf",
            "28",
            "--preset",
            "veryfast",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert "broken.mp4: broken.mp4: not a video" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "clip.mkv.mkv",
        "clip.mov.mp4",
        "named-wrong.mp4",
        "photo.png",
    ]
    assert read_video(out / "clip.mov.mp4").frames.shape[0] == 8
    assert read_video(out / "clip.mov.mp4").audio_packets > 0
    bad = subprocess.run(
        [sys.executable, "-m", "model.cli", "enhance", str(folder), "-o", str(out), "--crf", "99"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "crf for h264 must be" in bad.stderr


def test_moving_things_do_not_ghost(enhancer):
    """A bright square crossing a noisy dark background: where it was two frames ago, the
    temporal output is back to the background (no trail), as frame by frame is."""
    rng = np.random.default_rng(1)
    H, W = 120, 200
    clip = []
    for t in range(12):
        img = np.full((H, W, 3), 14.0) + rng.normal(0, 2.5, (H, W, 3))
        img[40:70, 10 + 12 * t : 40 + 12 * t] = 60
        clip.append(np.clip(img, 0, 255).astype(np.uint8))
    temporal = np.stack(list(enhance_frames(enhancer, iter(clip))))
    plain = np.stack(list(enhance_frames(enhancer, iter(clip), temporal=False)))
    t = 11  # the square's left edge is at 142; at t - 2 it covered 118..148
    left_behind = (slice(40, 70), slice(118, 136))
    trail = temporal[t][left_behind].astype(float).mean() - plain[t][left_behind].mean()
    square = plain[t][40:70, 145:170].mean() - plain[t][left_behind].mean()
    assert square > 60 and abs(trail) < 0.05 * square

    def grain(frame):  # the static background's noise: neighbour differences
        return np.diff(frame[85:120].astype(float), axis=1).std()

    assert grain(temporal[t]) < 0.8 * grain(plain[t])


def test_subtitles_are_copied_or_named_as_dropped(enhancer, tmp_path):
    """An SRT stream in Matroska survives into Matroska as it was; MP4 cannot hold SRT, so
    it is reported in `dropped_streams` instead of failing the video."""
    import av

    (tmp_path / "s.srt").write_text(
        "1\n00:00:00,000 --> 00:00:00,400\nline one\n\n2\n00:00:00,500 --> 00:00:00,900\nline two\n"
    )
    src = tmp_path / "in.mkv"
    with av.open(str(tmp_path / "s.srt")) as srt, av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        t = c.add_stream_from_template(srt.streams.subtitles[0])
        for p in srt.demux():
            if p.dts is not None:
                p.stream = t
                c.mux(p)
        for _ in range(25):
            c.mux(
                v.encode(
                    av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20, np.uint8), format="rgb24")
                )
            )
        c.mux(v.encode(None))

    def subtitles(path):
        with av.open(str(path)) as c:
            return [bytes(p) for p in c.demux(subtitles=0) if p.size]

    assert enhance_video(enhancer, src, tmp_path / "out.mkv").dropped_streams == []
    assert subtitles(tmp_path / "out.mkv") == subtitles(src) == [b"line one", b"line two"]
    assert enhance_video(enhancer, src, tmp_path / "out.mp4").dropped_streams == [
        "subtitle #1 (srt)"
    ]
