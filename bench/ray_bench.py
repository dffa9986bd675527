"""`sgz enhance` serial against `sgz enhance --ray` on this machine, one run, the same images:

  python -m bench.ray_bench --shared ../shared [--images 400] [--small 50] [--checkpoint PATH]

serial  `sgz enhance DIR -o OUT`, the command in a fresh process (model load, numba's cache)
ray     `sgz enhance DIR -o OUT --ray`, the same on a local Ray instance of its own (Ray's
        start-up, the actors' start-up and model loads included)

The images are the training set's 512x512 JPEGs (data/train), the first `--images` by name.
Each command runs twice, on the first `--small` images and on all of them, into fresh folders
(nothing skipped). `images/s` is the whole command on all images; `marginal images/s` the extra
images over the extra seconds, where start-up cancels out: the rate a long job runs at;
`start-up s` what is left of the small run once its images are paid at that rate. The outputs
of both paths are compared byte for byte. docs/bulk.md has a recorded run.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pick_images(shared: Path, count: int) -> list[Path]:
    found = sorted((shared / "data" / "train").glob("*.jpg"))[:count]
    if len(found) < count:
        raise SystemExit(f"only {len(found)} images in {shared}/data/train")
    return found


def timed(argv: list[str]) -> float:
    """Seconds the real command takes, in its own process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "model.cli", *argv], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sgz {' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
    return seconds


def rates(t: dict, small: int, count: int) -> dict:
    marginal = (count - small) / max(t[count] - t[small], 1e-9)
    return {
        "s": {n: round(v, 2) for n, v in t.items()},
        "images_per_s": round(count / t[count], 2),
        "marginal_images_per_s": round(marginal, 2),
        "startup_s": round(t[small] - small / marginal, 2),
    }


def run(shared: Path, count: int, small: int, checkpoint: str | None) -> dict:
    images = pick_images(shared, count)
    extra = ["--checkpoint", checkpoint] if checkpoint else []
    with tempfile.TemporaryDirectory(prefix="sgz-ray-bench-") as tmp:
        for n in (small, count):
            src = Path(tmp) / f"in{n}"
            src.mkdir()
            for p in images[:n]:
                shutil.copy(p, src / p.name)
        result = {"images": count, "small": small, "size": "512x512 JPEG"}
        for name, flag in (("serial", []), ("ray", ["--ray"])):
            t = {
                n: timed(["enhance", f"{tmp}/in{n}", "-o", f"{tmp}/{name}{n}", *extra, *flag])
                for n in (small, count)
            }
            result[name] = rates(t, small, count)
        result["identical_outputs"] = all(
            Path(tmp, f"serial{count}", p.stem + ".png").read_bytes()
            == Path(tmp, f"ray{count}", p.stem + ".png").read_bytes()
            for p in images
        )
    s, r = result["serial"], result["ray"]
    result["ray_over_serial"] = round(r["images_per_s"] / s["images_per_s"], 3)
    result["marginal_ray_over_serial"] = round(
        r["marginal_images_per_s"] / s["marginal_images_per_s"], 3
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path("../shared"))
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--small", type=int, default=50)
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args()
    r = run(args.shared, args.images, args.small, args.checkpoint)
    print(json.dumps(r, indent=2))
    print(
        f"{r['images']} images: serial {r['serial']['images_per_s']} images/s, ray "
        f"{r['ray']['images_per_s']} images/s, ray / serial = {r['ray_over_serial']}x; "
        f"marginal: serial {r['serial']['marginal_images_per_s']}, ray "
        f"{r['ray']['marginal_images_per_s']} images/s, ray / serial = "
        f"{r['marginal_ray_over_serial']}x; start-up: serial {r['serial']['startup_s']} s, "
        f"ray {r['ray']['startup_s']} s"
    )


if __name__ == "__main__":
    main()
