#!/usr/bin/env python
"""Build a canvas detection benchmark: real classification images pasted onto real backgrounds.

Writes OUT/train (train-split objects and backgrounds only) and OUT/test (test split only), each a
COCO set (images/*.png + annotations.json) that ``dfkd.data.detection.load_detection`` reads, and
prints the two json paths. Re-running with the same settings returns the finished sets at once.

    python scripts/build_detection_set.py --source digits --out data/digits_canvases
    DFKD_DATA=PATH python scripts/build_detection_set.py --source cifar10 --out data/cifar_canvases --train 2000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, choices=["digits", "cifar10"])
    ap.add_argument("--out", required=True, type=Path, help="output folder (gets train/ and test/)")
    ap.add_argument("--root", default=os.environ.get("DFKD_DATA"),
                    help="CIFAR-10 folder (cifar10_test.npz or its cifar10/ folder; default: $DFKD_DATA)")
    ap.add_argument("--train", type=int, default=None, help="train canvases (digits 2000, cifar10 5000)")
    ap.add_argument("--test", type=int, default=None, help="test canvases (digits 500, cifar10 1000)")
    ap.add_argument("--canvas-size", type=int, default=None, help="canvas side in pixels (digits 48, cifar10 64)")
    ap.add_argument("--object-pixels", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="object side range in pixels (digits 12 24, cifar10 16 38)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace a set built with other settings")
    args = ap.parse_args(argv)

    from dfkd.data.detection import build_canvas_benchmark
    from dfkd.errors import DfkdError

    try:
        paths = build_canvas_benchmark(args.source, args.out, root=args.root, train_canvases=args.train,
                                       test_canvases=args.test, canvas_size=args.canvas_size, seed=args.seed,
                                       object_pixels=tuple(args.object_pixels) if args.object_pixels else None,
                                       overwrite=args.overwrite)
    except DfkdError as e:
        print(f"build_detection_set: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(paths["train"])
    print(paths["test"])


if __name__ == "__main__":
    main()
