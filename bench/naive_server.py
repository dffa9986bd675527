"""Baseline (b): the FastAPI endpoint people write first. One `enhancer.enhance` per request,
no batching: FastAPI runs the sync endpoint in its thread pool, so requests run side by side.

    python -m bench.naive_server --port 8001 --checkpoint PATH
"""

import argparse
import contextlib

import uvicorn
from fastapi import FastAPI, File, Response, UploadFile

from bench.http_cases import enhance_kwargs
from model import load_model
from model.imageio import MEDIA_TYPES, decode_image, encode_image, output_format, tensor_to_rgb


def create_app(checkpoint: str, device: str = "cpu", query: str = "") -> FastAPI:
    kwargs = enhance_kwargs(query)  # the same work as sgz serve's /enhance?QUERY

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.enhancer = load_model(checkpoint, device=device)
        app.state.enhancer.warmup()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/enhance")
    def enhance(image: UploadFile = File(...)) -> Response:
        decoded = decode_image(image.file.read())
        out = app.state.enhancer.enhance(decoded.to_tensor(), **kwargs)
        fmt = output_format(None, decoded.format)  # answered in the format sent, as sgz serve
        body = encode_image(tensor_to_rgb(out), decoded.alpha, decoded.gray, fmt, 90)
        return Response(body, media_type=MEDIA_TYPES[fmt])

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--query", default="", help="enhance options as sgz serve's query string")
    args = p.parse_args()
    uvicorn.run(
        create_app(args.checkpoint, args.device, args.query),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
