"""python -m duetserve.runtime.generator tiny|small --out DIR: write a random-weight model."""

import argparse

from duetserve.runtime.generator.build import write_model
from duetserve.runtime.generator.spec import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.runtime.generator",
        description="Write a complete Hugging Face Llama-family model directory with random "
        "weights from a fixed seed and Duet's committed byte-level BPE tokenizer.",
    )
    parser.add_argument("preset", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype the weights are stored in (default float32)",
    )
    args = parser.parse_args()
    spec = PRESETS[args.preset].with_(seed=args.seed, storage_dtype=args.dtype)
    write_model(spec, args.out)


if __name__ == "__main__":
    main()
