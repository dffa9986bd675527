"""The Docker files, checked without a Docker engine: they parse, agree with the app's settings
and routes, and the image's healthcheck command works against a live server."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sgz_server import Server

from bench.servers import free_port
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = Settings.model_construct()  # the defaults, without reading the environment


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.setdefault(op.upper(), []).append(args.strip())
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_entrypoint_is_the_command_the_readme_runs():
    entrypoint = exec_form(dockerfile()["ENTRYPOINT"][-1])
    assert entrypoint == ["sgz", "serve"]
    # the README's main-job command is `make serve`, whose recipe runs `sgz serve`
    recipe = re.search(r"^serve:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and re.search(r"(^|/)sgz serve\b", recipe.group(1).strip())
    from model.cli import build_parser

    assert build_parser().parse_args(entrypoint[1:]).command == "serve"


def test_image_is_slim_non_root_and_listens_where_the_settings_say():
    df = dockerfile()
    assert re.search(r"python:\S*-slim", df["FROM"][0])
    user = df["USER"][-1]
    assert user not in ("root", "0")
    env = dict(kv.split("=", 1) for line in df["ENV"] for kv in shlex.split(line) if "=" in kv)
    assert env["SGZ_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert int(env["SGZ_PORT"]) == DEFAULTS.port
    assert df["EXPOSE"] == [str(DEFAULTS.port)]
    for copy in df["COPY"]:
        *sources, _ = copy.split()
        for source in sources:  # a trailing * marks an optional file
            assert source.endswith("*") or (ROOT / source).exists(), copy
    assert any("TORCH_INDEX_URL" in arg for arg in df["ARG"])  # the CUDA variant's switch


def test_healthcheck_calls_healthz_on_the_settings_port():
    check = dockerfile()["HEALTHCHECK"][0]
    command = exec_form(check.split("CMD", 1)[1].strip())
    assert "/healthz" in " ".join(command)
    assert f"'{DEFAULTS.port}'" in command[-1]


def test_healthcheck_command_passes_on_a_live_server_and_fails_without_one():
    command = exec_form(dockerfile()["HEALTHCHECK"][0].split("CMD", 1)[1].strip())
    command[0] = sys.executable  # the image's `python`
    server = Server()
    try:
        server.wait_ready()
        env = {**os.environ, "SGZ_PORT": str(server.port)}
        assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    finally:
        server.close()
    env = {**os.environ, "SGZ_PORT": str(free_port())}
    assert subprocess.run(command, env=env, capture_output=True).returncode != 0


def test_compose_runs_the_image_and_prometheus(compose):
    sgz, prometheus = compose["services"]["sgz"], compose["services"]["prometheus"]
    assert (ROOT / sgz["build"]["context"] / sgz["build"]["dockerfile"]).is_file()
    env = sgz["environment"]
    assert all(k.startswith("SGZ_") and k[4:].lower() in Settings.model_fields for k in env)
    assert int(env["SGZ_PORT"]) == DEFAULTS.port and env["SGZ_HOST"] == "0.0.0.0"
    container_ports = [int(str(p).rsplit(":", 1)[1]) for p in sgz["ports"]]
    assert container_ports == [DEFAULTS.port]
    assert prometheus["depends_on"]["sgz"]["condition"] == "service_healthy"
    assert "TORCH_INDEX_URL" in sgz["build"]["args"]
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"#\s*- driver: nvidia", text)  # the GPU reservation, documented


def test_prometheus_scrapes_the_service_metrics(compose):
    mounts = [v.split(":") for v in compose["services"]["prometheus"]["volumes"]]
    config_file = next(ROOT / src for src, dst, *_ in mounts if dst.endswith("prometheus.yml"))
    config = yaml.safe_load(config_file.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    from service.routes import router

    assert "/metrics" in {route.path for route in router.routes}
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"sgz:{DEFAULTS.port}" and "sgz" in compose["services"]


def test_cuda_image_installs_the_gpu_jpeg_extra_matching_torchs_cuda():
    import tomllib

    run = next(r for r in dockerfile()["RUN"] if "jpeg-cu12" in r)
    choose = run.split("&&")[0]  # the `case` that picks the extras
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    for index, want in [
        ("https://download.pytorch.org/whl/cpu", "otel"),
        ("https://download.pytorch.org/whl/cu128", "otel,jpeg-cu12"),
        ("https://download.pytorch.org/whl/cu130", "otel,jpeg-cu13"),
    ]:
        out = subprocess.run(
            ["bash", "-c", f"{choose}; echo $x"],
            env={"TORCH_INDEX_URL": index, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
        )
        assert out.stdout.strip() == want, (index, out.stderr)
        assert all(name in extras for name in want.split(","))
