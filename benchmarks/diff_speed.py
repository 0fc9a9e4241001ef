"""Streaming diff on a full-size model: a random-weight UNet with the SD 1.5 config (fp16, ~1.7 GB)
and its memedit edit, in diffusers-folder and single-file forms, made by this script (issue: diff).

Times `memedit diff BASE EDITED --recipe R` (process start and the verdict included) against
`sha256sum` of both weight files in the same run, the commands taking turns (target <= 1.0x), and
the peak RSS of diff (target <= 512 MB).

    python benchmarks/diff_speed.py [--work DIR] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import fullsize


def main() -> None:
    args, work, models = fullsize.setup(__doc__, "memedit-diff-speed-")
    rows = []
    for label, model in models:
        weights = fullsize.weights_file(model)
        recipe, out = fullsize.edited(model, work)
        edited_weights = out / weights.name
        b = out if model.is_dir() else edited_weights
        t = fullsize.interleaved(
            {
                "sha256sum": ["sha256sum", str(weights), str(edited_weights)],
                "diff": [*fullsize.MEMEDIT, "diff", str(model), str(b), "--recipe", str(recipe), "--summary"],
            },
            args.repeats,
        )
        rows.append(
            {
                "input": label,
                "GB_each": weights.stat().st_size / 1e9,
                "diff_s": t["diff"][0],
                "sha256_both_s": t["sha256sum"][0],
                "diff_ratio": t["diff"][0] / t["sha256sum"][0],
                "diff_rss_mb": t["diff"][1],
            }
        )
    common.table(rows, list(rows[0]))
    ok = all(r["diff_ratio"] <= 1.0 and r["diff_rss_mb"] <= 512 for r in rows)
    print(f"targets: diff_ratio <= 1.0, diff RSS <= 512 MB -> {'met' if ok else 'NOT met'}")
    common.write("diff_speed", {"rows": rows, "targets_met": ok})


if __name__ == "__main__":
    main()
