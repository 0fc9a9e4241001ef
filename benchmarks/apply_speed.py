"""Streaming apply on a full-size model: a random-weight UNet with the SD 1.5 config (fp16, ~1.7 GB),
in its diffusers folder and single-file forms, made by this script (issue: apply).

Times `memedit apply` (process start, input and output digests and the provenance included) against
`cp` and `sha256sum` of the same file in the same run, the commands taking turns (target: apply <=
1.0 x (cp + sha256sum)), and the peak RSS of apply (target <= 512 MB; a naive load_file/save_file
holds the whole 1.7 GB).

    python benchmarks/apply_speed.py [--work DIR] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import fullsize


def main() -> None:
    args, work, models = fullsize.setup(__doc__, "memedit-apply-speed-")
    rows = []
    for label, model in models:
        weights = fullsize.weights_file(model)
        recipe = fullsize.make_recipe(model, work / f"recipe-{model.name}.yaml")
        out = work / f"out-{model.name}"
        t = fullsize.interleaved(
            {
                "cp": ["cp", str(weights), str(work / "copy.bin")],
                "sha256sum": ["sha256sum", str(weights)],
                "apply": [*fullsize.MEMEDIT, "apply", str(recipe), "-o", str(out), "--overwrite"],
            },
            args.repeats,
        )
        (work / "copy.bin").unlink(missing_ok=True)
        rows.append(
            {
                "input": label,
                "GB": weights.stat().st_size / 1e9,
                "apply_s": t["apply"][0],
                "cp_s": t["cp"][0],
                "sha256_s": t["sha256sum"][0],
                "apply_ratio": t["apply"][0] / (t["cp"][0] + t["sha256sum"][0]),
                "apply_rss_mb": t["apply"][1],
            }
        )
    common.table(rows, list(rows[0]))
    ok = all(r["apply_ratio"] <= 1.0 and r["apply_rss_mb"] <= 512 for r in rows)
    print(f"targets: apply_ratio <= 1.0, apply RSS <= 512 MB -> {'met' if ok else 'NOT met'}")
    common.write("apply_speed", {"rows": rows, "targets_met": ok})


if __name__ == "__main__":
    main()
