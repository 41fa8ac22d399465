#!/usr/bin/env python
"""Why samples of a subject's prompts were not recognised, from the samples `quality.py` kept.

    python benchmarks/subject_misses.py liera-kv2.5e-3:liera lora-kv5e-4:lora

For each `recipe:method` (large budget), every kept sample (2 per kind of subject prompt and run) is
sorted into: recognised; drawn on a background of one of the subject's own colours (the analyser then
can't separate the subject from it); the subject's shape a close second to another shape (the toy base
draws a new shape, the cross, blobby); other. It also counts the backgrounds of the bare instance
prompt's samples. A diagnosis of the subject rates, not a score: it reads no more than quality.py kept.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: the repository's root on the path, as quality.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import REPO_ROOT, SUBJECTS, subject_info  # noqa: E402

if TYPE_CHECKING:
    from plugin.toy.analyser import Analysis

CLOSE_SECOND = 0.65  # the subject's shape score above which a miss counts as a close second


def why_missed(image: Image.Image, info: dict, analysis: Analysis | None = None) -> str:
    """The reason `image` is not recognised as the subject `info`, or "recognised" (`analysis`:
    `analyse(image)` where the caller has it already)."""
    from plugin.toy.analyser import analyse, analyse_subject

    verdict, analysis = analyse_subject(image, info), analysis or analyse(image)
    if verdict["is_subject"]:
        return "recognised"
    if analysis.background in info["colours"]:
        return "background of a subject colour"
    main = analysis.main  # the largest object, the one analyse_subject judged
    if main is not None and not verdict["shape_ok"] and main.shape_scores[info["shape"]] > CLOSE_SECOND:
        return "shape a close second"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="recipe:method, as in quality.py's work dir")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "quality"))
    args = parser.parse_args()
    from plugin.toy.analyser import analyse

    infos = {info["slug"]: info for info in map(subject_info, range(len(SUBJECTS)))}
    for spec in args.runs:
        recipe, method = spec.split(":")
        reasons: dict[str, Counter] = {}
        backgrounds: Counter = Counter()
        files = sorted(Path(args.work_dir, recipe, f"{method}-large").glob("*/seed*/judge_samples.npz"))
        if not files:
            raise SystemExit(
                f"{spec}: no judge_samples.npz under {Path(args.work_dir, recipe, method + '-large')}"
            )
        for path in files:
            info = infos[path.parent.parent.name]
            for kind, images in np.load(path).items():
                for array in images:
                    image = Image.fromarray(array)
                    analysis = analyse(image)
                    reasons.setdefault(kind, Counter())[why_missed(image, info, analysis)] += 1
                    if kind == "instance":
                        backgrounds[analysis.background] += 1
        print(f"{spec} ({len(files)} runs)")
        for kind, counts in reasons.items():
            print(f"  {kind}: " + ", ".join(f"{reason} {n}" for reason, n in counts.most_common()))
        print(
            "  instance prompt's backgrounds: " + ", ".join(f"{c} {n}" for c, n in backgrounds.most_common())
        )


if __name__ == "__main__":
    main()
