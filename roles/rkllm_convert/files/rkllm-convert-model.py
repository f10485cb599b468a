"""Convert one Hugging Face model to .rkllm with RKLLM-Toolkit's Python API.

Runs inside the toolkit's virtualenv (CPython 3.8-3.12, so no newer syntax here). The .rkllm is
written under a temporary name and renamed only after export succeeded, so an interrupted
conversion never leaves a file that looks finished. Prints one JSON line describing the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="Hugging Face repo id or local model directory")
    parser.add_argument("--output", required=True, help="the .rkllm file to write")
    parser.add_argument("--target-platform", default="rk3588")
    parser.add_argument("--quantized-dtype", default="w8a8")
    parser.add_argument("--quantized-algorithm", default="normal")
    parser.add_argument("--optimization-level", type=int, default=1)
    parser.add_argument("--num-npu-core", type=int, default=3)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default=None, help="quantization calibration JSON (optional)")
    return parser.parse_args(argv)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(step: str, status: int) -> None:
    if status != 0:
        raise SystemExit(f"rkllm-convert-model: {step} failed with status {status} "
                         "(see the toolkit's log above)")


def convert(args: argparse.Namespace) -> dict[str, object]:
    from rkllm.api import RKLLM  # the toolkit exists only inside its virtualenv

    llm = RKLLM()
    check("load_huggingface", llm.load_huggingface(model=args.source, model_lora=None, device=args.device))
    check("build", llm.build(
        do_quantization=True, optimization_level=args.optimization_level,
        quantized_dtype=args.quantized_dtype, quantized_algorithm=args.quantized_algorithm,
        target_platform=args.target_platform, num_npu_core=args.num_npu_core, extra_qparams=None,
        dataset=args.dataset, max_context=args.max_context,
    ))
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    check("export_rkllm", llm.export_rkllm(str(partial)))
    partial.replace(output)
    size = output.stat().st_size
    return {"path": str(output), "sha256": sha256_of(output), "size_mb": max(1, -(-size // (1 << 20)))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps(convert(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
