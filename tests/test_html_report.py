"""The HTML report renders in a real browser: headless Chromium takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from torch import nn

import tensorlog

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (make test installs it as root: apt-get install chromium)"
)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _runs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])
    x = torch.randn(4, 16)
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "a"}) as a:
        model(x)
        model[3][0].weight[0] += 0.05
    with torch.no_grad(), tensorlog.capture(model, {"output_dir": str(tmp_path), "run_name": "b"}) as b:
        model(x)
    return a.path, b.path


def test_html_report_renders_table_and_plot(tmp_path):
    a, b = _runs(tmp_path)
    report = tmp_path / "report.html"
    from clirun import run

    r = run("compare", a, b, "--output", report)
    assert r.returncode == 1, r.stderr
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "DIVERGES HERE" in dom and "<svg" in dom and "<polyline" in dom
    assert dom.count("<tr class=") == 12 + 6  # every module row: 6 blocks, 12 leaves
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,900", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), "Chromium wrote no screenshot"
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    plot_blue = sum(n for n, c in colors if abs(c[0] - 0x1F) < 30 and abs(c[1] - 0x77) < 30 and abs(c[2] - 0xB4) < 30)
    born_red = sum(n for n, c in colors if c[0] > 200 and c[1] < 80 and c[2] < 80)
    assert plot_blue > 200, "the error plot's line is not on the page"
    assert born_red > 20, "the diverging module's marker is not on the page"
    assert len(colors) > 50  # text, table rules and plot rendered, not a blank page
