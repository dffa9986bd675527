"""Baseline (c): LitServe serving the same `enhancer`, with LitServe's own dynamic batching
(the same batch size and wait as `sgz serve`'s defaults). LitServe batches whatever arrives;
EFE needs one size per forward pass, so `predict` runs one `enhance` per distinct size, on a
batch assembled the way sgz serve assembles its own (`service.inference.stack`: channels-last,
no transposes), so that only the serving around the model differs.

    python -m bench.litserve_server --port 8002 --checkpoint PATH
"""

import argparse

import litserve as ls
from fastapi import Request, Response

from bench.http_cases import enhance_kwargs
from model import load_model
from model.imageio import MEDIA_TYPES, decode_image, encode_image, output_format, tensor_to_rgb
from service.inference import stack

MAX_BATCH_SIZE = 16  # sgz serve's default SGZ_MAX_BATCH_SIZE
BATCH_TIMEOUT_S = 0.005  # sgz serve's default SGZ_MAX_WAIT_MS


class EnhanceAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, query: str = ""):
        super().__init__(
            max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/enhance"
        )
        self.checkpoint = checkpoint
        self.kwargs = enhance_kwargs(query)  # the same work as sgz serve's /enhance?QUERY

    def setup(self, device):  # "cpu", or "cuda:0" when started with --device cuda
        self.enhancer = load_model(self.checkpoint, device=device)
        self.enhancer.warmup()

    def decode_request(self, request: Request):
        return decode_image(request["image"].file.read())

    def batch(self, inputs):
        return inputs

    def predict(self, decoded_images):
        outs = [None] * len(decoded_images)
        by_size: dict[tuple, list[int]] = {}
        for i, d in enumerate(decoded_images):
            by_size.setdefault(d.rgb.shape, []).append(i)
        for idx in by_size.values():
            batch = stack([decoded_images[i].to_tensor() for i in idx])  # as sgz serve does
            for i, image in zip(idx, self.enhancer.enhance(batch, **self.kwargs)):
                outs[i] = (decoded_images[i], image)
        return outs

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        decoded, image = output
        fmt = output_format(None, decoded.format)  # answered in the format sent, as sgz serve
        body = encode_image(tensor_to_rgb(image), decoded.alpha, decoded.gray, fmt, 90)
        return Response(body, media_type=MEDIA_TYPES[fmt])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--query", default="", help="enhance options as sgz serve's query string")
    args = p.parse_args()
    server = ls.LitServer(
        EnhanceAPI(args.checkpoint, args.query),
        accelerator=args.device,
        devices=1,
        workers_per_device=1,
        timeout=120,
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
