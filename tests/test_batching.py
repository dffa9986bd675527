"""The micro-batching queue on its own: batch formation, limits, deadlines, disconnects,
failures, threads. Most tests drive it with a small recording `run_batch`; the last runs the
real model on real images through it."""

import asyncio
import io
import threading
import time

import pytest
import torch

from service.batching import (
    Batcher,
    BatcherClosed,
    BatchFailed,
    ClientDisconnected,
    DeadlineExceeded,
    QueueFull,
)


class Recorder:
    """A run_batch that records what it saw (and in which thread) and returns payload * 10."""

    def __init__(self, sleep_s: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.sleep_s = sleep_s
        self.fail_on = fail_on

    def __call__(self, payloads):
        self.threads.add(threading.get_ident())
        self.batches.append(list(payloads))
        if self.sleep_s:
            time.sleep(self.sleep_s)  # blocking on purpose: it must not block the loop
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError(f"cannot process {self.fail_on!r}")
        return [p * 10 for p in payloads]

    @property
    def seen(self) -> list:
        return [p for batch in self.batches for p in batch]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(recorder=None, **kwargs) -> Batcher:
    batcher = Batcher(recorder or Recorder(), **kwargs)
    batcher.start()
    return batcher


def test_same_key_shares_a_batch_and_keys_never_mix():
    async def main():
        rec = Recorder()
        b = await started(rec, max_batch_size=8, max_wait_s=0.05)
        results = await asyncio.gather(*(b.submit(i, key=i % 2) for i in range(6)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [i * 10 for i in range(6)]
    assert sorted(sorted(batch) for batch in rec.batches) == [[0, 2, 4], [1, 3, 5]]
    assert all(r.batch_size == 3 for r in results)


def test_full_batch_goes_without_waiting_for_the_timer():
    async def main():
        rec = Recorder()
        b = await started(rec, max_batch_size=4, max_wait_s=60)
        results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(8))), 10)
        await b.close()
        return rec, results

    rec, results = run(main())
    assert [len(batch) for batch in rec.batches] == [4, 4]
    assert [r.value for r in results] == [i * 10 for i in range(8)]


def test_a_group_that_never_fills_is_not_starved_by_groups_that_keep_filling():
    # Under load one image size keeps filling batches; a rare size must still run once it has
    # waited max_wait_s, before full batches that arrived after it (a p99 tail otherwise).
    async def main():
        rec = Recorder(sleep_s=0.1)
        b = await started(rec, max_batch_size=2, max_wait_s=0.01)
        busy = [asyncio.ensure_future(b.submit(i, key="common")) for i in range(2)]
        await asyncio.sleep(0.005)  # the first common batch is running
        rare = asyncio.ensure_future(b.submit(-1, key="rare"))
        await asyncio.sleep(0.03)  # rare is due; full common batches arrive after that
        later = [asyncio.ensure_future(b.submit(i, key="common")) for i in range(2, 12)]
        await asyncio.gather(rare, *busy, *later)
        await b.close()
        return rec

    rec = run(main())
    rare_at = next(i for i, batch in enumerate(rec.batches) if -1 in batch)
    assert rare_at == 1, rec.batches  # right after the running batch, not after five full ones


def test_pixel_budget_closes_a_batch_and_a_huge_image_runs_alone():
    async def main():
        rec = Recorder()
        b = await started(rec, max_batch_size=16, max_batch_pixels=250, max_wait_s=0.2)
        await asyncio.gather(*(b.submit(i, pixels=100) for i in range(6)))
        await b.submit(99, pixels=1000)
        await b.close()
        return rec

    rec = run(main())
    assert [len(batch) for batch in rec.batches] == [2, 2, 2, 1]
    assert rec.batches[-1] == [99]


def test_wait_timer_starts_at_arrival_not_at_queueing():
    async def main():
        b = await started(max_wait_s=1.0)
        t0 = time.monotonic()
        await b.submit(1, arrival=t0 - 0.9)  # e.g. the request spent 0.9 s being decoded
        early = time.monotonic() - t0
        t0 = time.monotonic()
        await b.submit(2)
        normal = time.monotonic() - t0
        await b.close()
        return early, normal

    early, normal = run(main())
    assert early < 0.6, f"a request that arrived 0.9 s ago waited {early:.2f} s more"
    assert normal >= 0.95


def test_nothing_coming_means_no_wait_and_something_coming_means_waiting():
    """A lone request runs at once when the caller reports no other job on its way; while
    one is, it waits (up to max_wait_s) to share the batch."""

    async def main():
        coming = [0]
        b = await started(max_wait_s=2.0, coming=lambda: coming[0])
        alone = await b.submit(1)
        coming[0] = 1
        waiting = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # a job is on its way: worth waiting for
        coming[0] = 0
        shared = await asyncio.gather(waiting, b.submit(3))  # it arrived: both go at once
        await b.close()
        return alone, shared

    alone, shared = run(main())
    assert alone.queue_s < 1.0 and alone.batch_size == 1
    assert [r.batch_size for r in shared] == [2, 2] and shared[0].queue_s < 1.5


def test_queue_full_answers_at_once():
    async def main():
        rec = Recorder()
        b = await started(rec, max_wait_s=60, max_queue_size=2)
        queued = [asyncio.create_task(b.submit(i)) for i in range(2)]
        await asyncio.sleep(0)  # let both get queued
        assert b.depth == 2 and b.full
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            await b.submit(3)
        refused_in = time.monotonic() - t0
        await b.close()  # drains the two queued ones
        return rec, [r.value for r in await asyncio.gather(*queued)], refused_in

    rec, values, refused_in = run(main())
    assert values == [0, 10] and rec.seen == [0, 1]
    assert refused_in < 0.5


def test_deadline_while_queued_gives_deadline_exceeded_and_is_never_computed():
    drops = []

    async def main():
        rec = Recorder()
        b = await started(rec, max_wait_s=60, on_drop=drops.append)
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await b.submit("late", deadline=time.monotonic() + 0.2)
        assert b.depth == 0
        with pytest.raises(DeadlineExceeded):  # already past: refused before queueing
            await b.submit("later", deadline=time.monotonic() - 1)
        other = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        await b.close()
        return rec, (await other).value

    rec, value = run(main())
    assert rec.seen == [1] and value == 10
    assert drops == ["deadline", "deadline"]


def test_disconnected_client_is_dropped_before_its_batch_runs():
    drops = []

    async def gone() -> bool:
        return True

    async def here() -> bool:
        return False

    async def main():
        rec = Recorder()
        b = await started(rec, max_batch_size=8, max_wait_s=0.05, on_drop=drops.append)
        outcome = await asyncio.gather(
            b.submit(1, is_disconnected=gone),
            b.submit(2, is_disconnected=here),
            return_exceptions=True,
        )
        await b.close()
        return rec, outcome

    rec, (first, second) = run(main())
    assert isinstance(first, ClientDisconnected)
    assert second.value == 20 and second.batch_size == 1
    assert rec.seen == [2] and drops == ["disconnected"]


def test_a_failing_batch_fails_only_its_jobs_and_the_loop_goes_on():
    async def main():
        rec = Recorder(fail_on=7)
        b = await started(rec, max_batch_size=8, max_wait_s=0.05)
        outcome = await asyncio.gather(
            b.submit(7, key="a"), b.submit(8, key="a"), b.submit(1, key="b"), return_exceptions=True
        )
        after = await b.submit(2, key="a")
        await b.close()
        return outcome, after

    (bad, also_bad, good), after = run(main())
    assert isinstance(bad, BatchFailed) and isinstance(also_bad, BatchFailed)
    assert "cannot process 7" in str(bad)
    assert good.value == 10 and after.value == 20


def test_wrong_result_count_and_broken_hooks_do_not_stop_the_loop():
    def hook(*args):
        raise ValueError("metrics hook bug")

    async def main():
        b = await started(lambda payloads: payloads[:-1], max_wait_s=0.01)
        with pytest.raises(BatchFailed, match="returned 0 values for 1 jobs"):
            await b.submit(1)
        await b.close()
        c = await started(Recorder(), max_wait_s=0.01, on_batch=hook)
        first = await c.submit(1)  # the hook runs after results are delivered
        second = await c.submit(2)
        await c.close()
        return first.value, second.value

    assert run(main()) == (10, 20)


def test_inference_runs_in_one_worker_thread_and_never_blocks_the_loop():
    async def main():
        rec = Recorder(sleep_s=0.3)
        b = await started(rec, max_batch_size=2, max_wait_s=0.01)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await asyncio.gather(*(b.submit(i) for i in range(4)))
        t.cancel()
        await b.close()
        return rec, ticks

    rec, ticks = run(main())
    assert len(rec.batches) == 2
    assert len(rec.threads) == 1 and threading.get_ident() not in rec.threads
    assert ticks >= 10, f"the event loop ticked only {ticks} times during 0.6 s of inference"


def test_close_runs_what_is_queued_and_refuses_new_work():
    async def main():
        rec = Recorder()
        b = await started(rec, max_wait_s=60)
        queued = [asyncio.create_task(b.submit(i, key=i)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.wait_for(b.close(), 10)  # not 60 s: closing makes every group due
        with pytest.raises(BatcherClosed):
            await b.submit(9)
        return rec, [r.value for r in await asyncio.gather(*queued)]

    rec, values = run(main())
    assert values == [0, 10, 20] and sorted(rec.seen) == [0, 1, 2]


def test_cancelled_submitter_is_withdrawn():
    async def main():
        rec = Recorder()
        b = await started(rec, max_wait_s=60)
        task = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        assert b.depth == 1
        task.cancel()
        await asyncio.sleep(0)
        depth = b.depth
        await b.close()
        return rec, depth

    rec, depth = run(main())
    assert depth == 0 and rec.seen == []


def test_real_images_batched_by_size_equal_enhance_one_by_one(published_enhancer):
    """Mixed sizes, strengths and tasks through the batcher with the real model."""
    from conftest import SICE

    from model.imageio import decode_image
    from service.inference import ENHANCE, FACTOR, Work, run_batch

    files = sorted(SICE.glob("*.png"))[:6]
    crops = [decode_image(f.read_bytes()).to_tensor()[..., :192, :256] for f in files[:4]]
    crops += [decode_image(f.read_bytes()).to_tensor()[..., :256, :192] for f in files[4:]]
    works = [Work(img, s, ENHANCE) for img, s in zip(crops, [1.0, 0.5, 1.0, 0.25, 1.0, 0.8])]
    works.append(Work(crops[0], 1.0, FACTOR))
    rec_sizes = []
    published_enhancer.warmup()  # compile the kernels (cold in CI) outside run()'s 30 s bound

    def run_recorded(payloads):
        rec_sizes.append(sorted({w.key for w in payloads}))
        return run_batch(published_enhancer, payloads)

    async def main():
        b = await started(run_recorded, max_batch_size=8, max_wait_s=0.1)
        results = await asyncio.gather(*(b.submit(w, key=w.key, pixels=w.pixels) for w in works))
        await b.close()
        return results

    results = run(main())
    assert all(len(keys) == 1 for keys in rec_sizes)  # one size and task per forward pass
    assert max(r.batch_size for r in results) == 4
    for work, result in zip(works, results):
        out = result.value
        expected, r_low = published_enhancer.enhance(work.image, work.strength, return_factor=True)
        if work.task == FACTOR:  # the model's own map: no exposure, no strength
            r_model = published_enhancer.factor_lowres(work.image)
            torch.testing.assert_close(out.factor_lowres, r_model[0], atol=1e-5, rtol=0)
            assert out.image is None
            continue
        torch.testing.assert_close(out.factor_lowres, r_low[0], atol=1e-5, rtol=0)
        assert out.image.shape == work.image.shape
        diff = (out.image.int() - expected.int()).abs().max().item()
        assert diff <= 1, f"batched output differs from enhance by {diff} grey levels"


def test_a_batch_of_decoded_photos_stays_channels_last(published_enhancer):
    """Decoded photos are channels-last; a batch of them must reach the model and come back
    that way, so that no image is transposed in or out (torch.cat made the batch planar)."""
    from conftest import SICE
    from PIL import Image

    from model.backends import channels_last
    from model.imageio import decode_image, tensor_to_rgb
    from service.inference import ENHANCE, Work, run_batch, stack

    images = []
    for f in sorted(SICE.glob("*.png"))[:3]:
        with Image.open(f) as im:
            png = io.BytesIO()
            im.convert("RGB").crop((0, 0, 224, 160)).save(png, "PNG")
        images.append(decode_image(png.getvalue()).to_tensor())  # exactly as the service does
    batch = stack(images)
    assert channels_last(batch) and batch.shape == (3, 3, 160, 224)
    for i, image in enumerate(images):
        assert torch.equal(batch[i : i + 1], image)
    outputs = run_batch(published_enhancer, [Work(i, 1.0, ENHANCE) for i in images])
    for image, out in zip(images, outputs):
        assert channels_last(out.image)
        rgb = tensor_to_rgb(out.image)  # a view of the model's answer, not a copy
        assert rgb.base is not None and rgb.flags.c_contiguous
        expected = published_enhancer.enhance(image)
        assert (out.image.int() - expected.int()).abs().max().item() <= 1
