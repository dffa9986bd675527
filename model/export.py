"""`sgz export`: the enhancer as one ONNX graph, for ONNX Runtime, Triton, TensorRT and others.

By default the graph is what `enhance(images)` does with its defaults: downscale, EFE, level
gain, exposure "auto" (model/onnx_stages.py: the bisection unrolled), factor upsampling, the
eight RIE steps, rounding and the denoising stage (strength 1). `--denoise` and `--exposure`
choose as `sgz enhance`'s do; `--denoise 0 --exposure model` is the paper's step with our level
gain alone (model/onnx_graph.py). Needs the `onnx` extra: pip install 'sgz-serve[onnx]'.
"""

import argparse
import io
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .enhancer import AUTO_EXPOSURE, AUTO_MAX_LIFT, DENOISE, Enhancer, check_options, load_model
from .exposure import ITERATIONS, MAX_SAMPLES
from .onnx_graph import ApplyFactor, EnhanceGraph, FactorLowres
from .onnx_stages import Denoise, ExposureShift

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12, TensorRT >= 8.6, Triton's onnxruntime backend
OPSETS = range(11, 21)  # Round and Range need 11; 20 is the TorchScript exporter's last
EXTRA_HINT = "pip install 'sgz-serve[onnx]' (onnx and onnxruntime)"
CONTENTS = (
    "uint8 (N,3,H,W) -> downscale 1/{s} (bilinear) -> EFE{level}{exposure} -> bilinear "
    "upsample (align_corners) -> {steps} RIE steps (Eq. 1) -> round{denoise} -> uint8 "
    "(N,3,H,W); = enhance(denoise={d:g}, exposure={e!r}){missing}"
)
DYNAMIC = {0: "batch", 2: "height", 3: "width"}


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(f"ONNX export needs the onnx package: {EXTRA_HINT}") from None
    return onnx


def version() -> str:
    try:
        return metadata.version("sgz-serve")
    except metadata.PackageNotFoundError:
        return "unknown"


def to_onnx(
    module: torch.nn.Module,
    inputs: tuple,
    input_names: list[str],
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
) -> bytes:
    """Trace `module` on `inputs` (the TorchScript exporter: no onnxscript needed) with every
    input's and output's batch, height and width dynamic."""
    dynamic = {name: DYNAMIC for name in input_names + output_names}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TracerWarnings and the exporter's deprecation notice
        warnings.simplefilter("ignore")
        # the TorchScript exporter writes to a file object too; torch's stub types `f` as a path
        torch.onnx.export(
            module.eval(),
            inputs,
            buf,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic,
        )
    return buf.getvalue()


def example(float_io: bool) -> torch.Tensor:
    """A trace input of odd size: no size is special-cased in the trace."""
    return (
        torch.rand(1, 3, 37, 53)
        if float_io
        else torch.randint(0, 256, (1, 3, 37, 53), dtype=torch.uint8)
    )


def export_parts(
    efe, scale_factor: float, steps: int, opset: int = DEFAULT_OPSET
) -> tuple[bytes, bytes]:
    """The two halves `Enhancer` calls, uint8: images -> r_low, and (images, r_low) -> out."""
    images = example(False)
    lowres = FactorLowres(efe, scale_factor)
    with torch.no_grad():
        r_low = lowres(images)
    return (
        to_onnx(lowres, (images,), ["images"], ["factor_lowres"], opset),
        to_onnx(
            ApplyFactor(steps), (images, r_low), ["images", "factor_lowres"], ["enhanced"], opset
        ),
    )


def stages(
    enhancer: Enhancer, denoise: float, exposure: float | str | None, float_io: bool = False
):
    """The exposure and denoising modules for `EnhanceGraph` (None where off), as `enhance`
    runs them with these options."""
    check_options(1.0, denoise, exposure)
    expose = None
    if exposure == "auto":
        expose = ExposureShift(
            AUTO_EXPOSURE, enhancer.steps, floor=True, max_lift=AUTO_MAX_LIFT, float_input=float_io
        )
    elif exposure is not None:
        expose = ExposureShift(float(exposure), enhancer.steps, float_input=float_io)
    return expose, (
        Denoise(float(denoise), enhancer.steps, enhancer.denoise_config) if denoise > 0 else None
    )


def describe(enhancer: Enhancer, denoise: float, exposure: float | str | None) -> str:
    """sgz.contents: the pipeline in one line, including what is not in it."""
    if exposure == "auto":
        exp = (
            f" -> exposure auto (x_r + offset per image, bisection {ITERATIONS} iterations "
            f"on <= {MAX_SAMPLES} samples: mean {AUTO_EXPOSURE} where darker, "
            f"lift <= {AUTO_MAX_LIFT})"
        )
    elif exposure is None:
        exp = ""
    else:
        exp = (
            f" -> exposure {float(exposure):g} (x_r + offset per image, bisection "
            f"{ITERATIONS} iterations on <= {MAX_SAMPLES} samples)"
        )
    dn = (
        f" -> denoise {denoise:g} (noise estimate, guided filter on L, R-L, B-L)"
        if denoise > 0
        else ""
    )
    missing = [
        m for m, off in (("no exposure", exposure is None), ("no denoising", denoise == 0)) if off
    ]
    return CONTENTS.format(
        s=enhancer.scale_factor,
        steps=enhancer.steps,
        exposure=exp,
        level=" + level gain" if enhancer.checkpoint.level else "",
        denoise=dn,
        d=denoise,
        e=exposure if exposure in (None, "auto") else float(exposure),
        missing=": " + ", ".join(missing) if missing else "",
    )


def export(
    enhancer: Enhancer,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    factor_only: bool = False,
    float_io: bool = False,
    *,
    denoise: float = DENOISE,
    exposure: float | str | None = "auto",
) -> bytes:
    """The ONNX model (bytes; also written to `out` when given): input "images", output
    "enhanced" (or "factor" with `factor_only`), metadata naming the checkpoint and contents.
    `denoise` and `exposure` as `Enhancer.enhance` takes them (the same defaults); the graph
    equals `enhancer.enhance(images, denoise=denoise, exposure=exposure)`. `factor_only`
    exports `Enhancer.factor` (the model's map: exposure and denoising do not apply)."""
    onnx = require_onnx()
    if factor_only:
        denoise, exposure = 0.0, None
    expose, denoiser = stages(enhancer, denoise, exposure, float_io)
    graph = EnhanceGraph(
        enhancer.efe, enhancer.scale_factor, enhancer.steps, factor_only, float_io, expose, denoiser
    )
    output = "factor" if factor_only else "enhanced"
    model = onnx.load_from_string(to_onnx(graph, (example(float_io),), ["images"], [output], opset))
    contents = describe(enhancer, denoise, exposure)
    if factor_only:
        contents = contents.split(" -> bilinear upsample")[0] + (
            " -> bilinear upsample (align_corners) -> factor x_r float32 (N,3,H,W) in [-1, 1]"
            " = Enhancer.factor()"
        )
    if float_io:
        contents = (
            "float32 in [0, 1] instead of uint8, unrounded (the denoiser, if any, on the "
            "unrounded RIE output); " + contents
        )
    meta = {
        "sgz.checkpoint_sha256": enhancer.sha256,
        "sgz.version": version(),
        "sgz.checkpoint_source": enhancer.checkpoint.source,
        "sgz.scale_factor": str(enhancer.scale_factor),
        "sgz.steps": str(enhancer.steps),
        "sgz.contents": contents,
        "sgz.io": "float32" if float_io else "uint8",
        "sgz.denoise": f"{denoise:g}",
        "sgz.exposure": (
            "model"
            if exposure is None
            else exposure
            if exposure == "auto"
            else f"{float(exposure):g}"
        ),
    }
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name, model.producer_version = "sgz-serve", version()
    model.doc_string = contents
    data = model.SerializeToString()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)  # never a half-written model at OUT
    return data


HELP = """\
By default the graph is `sgz enhance`'s default output: downscale, EFE, level gain, exposure
"auto", bilinear factor upsampling, the RIE steps, rounding, denoising (strength 1).
--denoise and --exposure choose as in `sgz enhance`; `--denoise 0 --exposure model` is the
paper's step with our level gain alone (the smallest, fastest graph). Inputs of any batch,
height and width. Input "images" uint8 (N, 3, H, W) RGB; output "enhanced" uint8 (N, 3, H, W),
or with --factor-only "factor" float32 (N, 3, H, W), the model's map (no exposure, no
denoising); --float: float32 in [0, 1] in and out. Metadata (sgz.checkpoint_sha256,
sgz.version, sgz.contents, sgz.denoise, sgz.exposure) says what is inside.

exit status: 0 written, 2 bad usage, checkpoint or missing onnx package.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the enhancer as an ONNX graph",
        description="Export SGZ (EFE + RIE) as one ONNX graph, for ONNX Runtime or Triton.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", type=Path, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="an sgz-serve checkpoint or a published raw state dict "
        "(default: the project's own checkpoint)",
    )
    p.add_argument(
        "--opset",
        type=_opset,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--factor-only",
        action="store_true",
        help="export the factor map x_r at full size instead of the enhanced image",
    )
    p.add_argument(
        "--float",
        action="store_true",
        dest="float_io",
        help="float32 in [0, 1] in and out instead of uint8",
    )
    from .enhance_cli import add_quality_options

    add_quality_options(p)  # --denoise, --exposure: the stages in the graph, as `sgz enhance`
    p.set_defaults(func=run)


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    # checked here: the exporter's own refusal dumps its whole IR
    if value is None or value not in OPSETS:
        raise argparse.ArgumentTypeError(
            f"must be an integer in {OPSETS[0]}-{OPSETS[-1]}, got {text!r}"
        )
    return value


def run(args) -> int:
    if args.factor_only and (args.denoise != DENOISE or args.exposure != "auto"):
        print(
            "sgz export: error: --factor-only exports the model's factor map; --denoise and "
            "--exposure do not apply to it",
            file=sys.stderr,
        )
        return 2
    try:
        require_onnx()
        enhancer = load_model(args.checkpoint, backend="eager", device="cpu")
        export(
            enhancer,
            args.output,
            args.opset,
            args.factor_only,
            args.float_io,
            denoise=args.denoise,
            exposure=args.exposure,
        )
    except (CheckpointError, ImportError) as e:
        print(f"sgz export: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:  # e.g. an opset the exporter does not support
        print(f"sgz export: error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} (checkpoint {enhancer.sha256[:12]}, opset {args.opset})")
    return 0
