"""Make the demo teacher that `fopro distill` (no options) uses, and that fopro ships in fopro/assets/.

    python scripts/make_demo_teacher.py                      # writes fopro/assets/demo_teacher.{safetensors,json}
    python scripts/make_demo_teacher.py --out /tmp/teacher   # somewhere else, e.g. to check it is reproduced

It generates fopro's synthetic "public" corpus (in $FOPRO_CACHE, as the demo does), pre-trains a resnet18 on it for
6 epochs with fopro's default recipe (fopro.defaults.demo_teacher_config) on ONE CPU thread, so that the result is
deterministic for a torch build, and stores the best checkpoint in half precision. It prints the sha256 of the
weights: fopro.defaults.DEMO_TEACHER_SHA256 must be set to it when the shipped file is replaced.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fopro.cli.common import progress_bar
from fopro.defaults import DEMO_TEACHER, DEMO_TEACHER_SHA256, make_demo_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_TEACHER, help="checkpoint path (NAME.safetensors; NAME.json is written beside it)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the training run (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fopro-demo-teacher-") as tmp, progress_bar() as progress:
        result = make_demo_teacher(args.out, args.work or Path(tmp), progress)
    result["matches_shipped_sha256"] = result["sha256"] == DEMO_TEACHER_SHA256
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
