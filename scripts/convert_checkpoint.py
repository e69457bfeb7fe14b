#!/usr/bin/env python
"""Convert a published checkpoint into a folder that this repository's code loads.

    python scripts/convert_checkpoint.py --arch ARCH --src SRC --dst DST [--dtype float32|bfloat16|float16]
        [--keep-quantized (chatglm-6b)]

ARCH is one of the names registered by the modules in scripts/converters/ (chatglm-6b, glm, cogview,
gpt2, bart). DST becomes a folder that `Auto*.from_pretrained(DST, trust_remote_code=True)` loads:
config.json with auto_map, safetensors weights, the model code files, tokenizer files where SRC had
them and generation_config.json. It is written to a temporary folder and renamed at the end.
`--keep-quantized` (chatglm-6b only) saves the weights torchao int8 weight-only instead; see
scripts/converters/glm.py.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from converters.common import ConversionError, output_dir, parse_dtype  # noqa: E402


def discover() -> tuple[dict, list]:
    """Collect ARCHS from every converters.<family> module."""
    import converters

    archs, modules = {}, []
    for info in pkgutil.iter_modules(converters.__path__):
        if info.name == "common":
            continue
        module = importlib.import_module(f"converters.{info.name}")
        modules.append(module)
        for name, fn in getattr(module, "ARCHS", {}).items():
            if name in archs:
                raise RuntimeError(f"architecture {name!r} is registered twice")
            archs[name] = fn
    return archs, modules


def main(argv: list[str] | None = None) -> int:
    archs, modules = discover()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", required=True, choices=sorted(archs), help="source architecture")
    parser.add_argument("--src", required=True, type=Path, help="folder of the source checkpoint")
    parser.add_argument("--dst", required=True, type=Path, help="folder to create")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast floating-point weights (default: keep the source dtype)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    for module in modules:
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        for module in modules:
            if hasattr(module, "check_arguments"):
                module.check_arguments(args)  # refuse flags that cannot work before DST is touched
        dtype = parse_dtype(args.dtype)
        if not args.src.is_dir():
            raise ConversionError(f"--src {args.src} is not a folder")
        with output_dir(args.dst, overwrite=args.overwrite) as out:
            archs[args.arch](args.src, out, dtype, args)
    except ConversionError as err:
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.arch} checkpoint {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
