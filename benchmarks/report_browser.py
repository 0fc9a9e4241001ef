"""Open an evaluation report in a real headless browser and check that it shows the grid (issue: eval).

Renders REPORT_DIR/report.html with Chromium (`chromium --headless --screenshot`), then looks for
REPORT_DIR/grid.png pixel for pixel inside the screenshot, and checks that the image embedded in the
HTML is byte-identical to grid.png and matches the digest in metrics.json (the generated images).

    python benchmarks/report_browser.py REPORT_DIR        # e.g. memedit-demo/report
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def screenshot(html: Path, out: Path, width: int = 1400, height: int = 2400) -> None:
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # root in containers
                "--disable-gpu",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                html.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def find_subimage(big: np.ndarray, small: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) where `small` appears exactly inside `big`, or None."""
    h, w = small.shape[:2]
    # anchor on the least common colour of the small image, then check every candidate window
    flat = small.reshape(-1, small.shape[2])
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    anchor = colours[np.argmin(counts)]
    ay, ax = np.argwhere((small == anchor).all(axis=2))[0]
    for y, x in np.argwhere((big == anchor).all(axis=2)):
        y0, x0 = y - ay, x - ax
        if y0 < 0 or x0 < 0 or y0 + h > big.shape[0] or x0 + w > big.shape[1]:
            continue
        if np.array_equal(big[y0 : y0 + h, x0 : x0 + w], small):
            return int(y0), int(x0)
    return None


def check(report_dir: Path) -> dict:
    from PIL import Image

    html = (report_dir / "report.html").read_text(encoding="utf-8")
    grid_bytes = (report_dir / "grid.png").read_bytes()
    metrics = json.loads((report_dir / "metrics.json").read_text(encoding="utf-8"))
    m = re.search(r'<img id="grid"[^>]*src="data:image/png;base64,([^"]+)"', html)
    embedded = base64.b64decode(m.group(1)) if m else b""
    grid = np.asarray(Image.open(report_dir / "grid.png").convert("RGB"))
    with tempfile.TemporaryDirectory() as d:
        shot = Path(d) / "shot.png"
        # a window tall and wide enough for the summary table above the grid and the whole grid
        screenshot(report_dir / "report.html", shot, max(1400, grid.shape[1] + 200), grid.shape[0] + 1200)
        page = np.asarray(Image.open(shot).convert("RGB"))
    where = find_subimage(page, grid)
    return {
        "embedded_equals_grid_png": embedded == grid_bytes,
        "grid_sha256_matches_metrics": hashlib.sha256(grid_bytes).hexdigest() == metrics.get("grid_sha256"),
        "grid_shown_at": where,
        "screenshot_size": list(page.shape[:2]),
        "grid_size": list(grid.shape[:2]),
    }


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    res = check(Path(sys.argv[1]))
    for k, v in res.items():
        print(f"{k}: {v}")
    ok = res["embedded_equals_grid_png"] and res["grid_sha256_matches_metrics"] and res["grid_shown_at"] is not None
    print("report renders the generated grid" if ok else "REPORT CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
