"""The HTML report: escaping of untrusted text, self-containment, and a real browser render."""

import re
import shutil
import subprocess

import pytest

from grass_llm.report import DocScore, QueryReport, TokenScore, render_report

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def sample_report() -> str:
    q = QueryReport("q<1>", "What is <b>bold</b>?",
                    [TokenScore(" The", 0.1), TokenScore(" answer", 2.0, "top: doc <3>"),
                     TokenScore(" <eos>", -1.0)],
                    [DocScore(1, "doc<1>", 12.5, EVIL), DocScore(2, "doc2", -3.0, None)])
    return render_report([q], meta={"model": "tiny <model>"})


def test_untrusted_text_is_escaped_and_the_file_is_self_contained():
    page = sample_report()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "onerror=alert(1)&gt;" in page
    assert "doc&lt;1&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "(text unavailable)" in page
    # no external resources: nothing to fetch over the network
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "<link" not in page and "@import" not in page


def test_token_shading_follows_sign_and_magnitude():
    page = sample_report()
    shades = re.findall(r'rgba\((\d+,\d+,\d+),([\d.]+)\)" title', page)
    assert shades[1] == ("255,140,0", "0.850")  # the largest positive token: full orange
    assert shades[2][0] == "30,110,255"  # negative influence: blue
    assert float(shades[0][1]) < float(shades[2][1]) < float(shades[1][1])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_headless_chromium_renders_a_non_blank_page(tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(sample_report(), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1000,700", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 20  # text and shading, not a blank page
    # the orange shading of the most influential token is on screen
    assert any(r > 200 and 100 < g < 190 and b < 100 for _, (r, g, b) in colors)
