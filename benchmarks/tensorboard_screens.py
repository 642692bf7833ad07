"""Screenshots of TensorBoard's views of finished runs, in a real headless browser.

Starts ``tensorboard --logdir LOGDIR`` on a free local port, loads each view in headless
Chromium (``chromium`` or ``chromium-browser`` on the PATH; Debian: ``apt-get install
chromium``) at the given window size, and writes one PNG per view into ``--out``: what a
user sees with TensorBoard's default settings, for a person (or an image-reading tool) to
check that the figures read right:

- ``time_series``: the Time Series tab through the README's link (``?smoothing=0``, tags
  ``continual/acc``): the per-experience accuracies unsmoothed;
- ``custom_scalars``: the Custom Scalars tab through the README's link
  (``#custom_scalars&_smoothingWeight=0``; Mneme's layout: every test experience's
  accuracy in one chart, the summary in another);
- ``hparams``: the HParams tab's table (short ``Callbacks``/``Data``/``Model`` columns, the
  seed as text, the ``final/*`` metrics on screen);
- ``text``: the Text tab (``continual/table/text_summary``, the printed table).

    mneme fit --config configs/quickstart.yaml
    mneme fit --config configs/quickstart.yaml --trainer.callbacks '[]'
    python -m benchmarks.tensorboard_screens --logdir logs --out screens

A script, not a test: it needs a browser the CI image does not have.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# The views, as the README links them (the hash picks the tab; Time Series reads
# ``smoothing`` and ``tagFilter`` from the query).
VIEWS = {
    "time_series": "/?smoothing=0&tagFilter=continual%2Facc#timeseries",
    "custom_scalars": "/#custom_scalars&_smoothingWeight=0",
    "hparams": "/#hparams",
    "text": "/#text",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("tensorboard_screens: no chromium on the PATH (Debian: apt-get install chromium)")


def wait_until_up(url: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url + "/data/runs", timeout=5) as answer:
                if answer.status == 200 and answer.read().strip() not in (b"", b"[]"):
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"tensorboard_screens: TensorBoard did not answer at {url} in {timeout:.0f} s")


def screenshot(chrome: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    subprocess.run(
        [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
         f"--screenshot={path}", url],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="folder of finished runs (logs)")
    parser.add_argument("--out", default="tensorboard_screens", help="folder for the PNGs")
    parser.add_argument("--size", default="1400,900", help="browser window, WIDTH,HEIGHT")
    parser.add_argument("--wait_ms", type=int, default=20000, help="page time before the shot")
    options = parser.parse_args()
    chrome, port = browser(), free_port()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", options.logdir,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base)
        for name, view in VIEWS.items():
            path = out / f"{name}.png"
            screenshot(chrome, base + view, path.resolve(), options.size, options.wait_ms)
            print(f"{name}: {path} ({base + view})", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
