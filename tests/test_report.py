"""The HTML report: escaping of untrusted text (query and training sides), self-containment,
and a real browser render with both sides shaded."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from grass_llm.report import DocScore, QueryReport, TokenScore, render_report, token_scores

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def sample_report(doc_scale: float = 1.0) -> str:
    """A query with shaded response tokens; its top document's tokens scored ``doc_scale``
    times (0: the same text and layout, nothing shaded)."""
    doc = token_scores(["The", " capital", EVIL, " is", " Paris", "."],
                       np.array([0.1, -3.0, 0.5, 0.0, 3.0, 0.2]) * doc_scale,
                       positions=[1, 2, 3, 4, 5, 6])
    q = QueryReport("q<1>", "What is <b>bold</b>?",
                    [TokenScore(" The", 0.1), TokenScore(" answer", 2.0, "top: doc <3>"),
                     TokenScore(" <eos>", -1.0)],
                    [DocScore(1, "doc<1>", 12.5, EVIL, doc), DocScore(2, "doc2", -3.0, None)])
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


def test_token_shading_follows_sign_and_magnitude_on_both_sides():
    page = sample_report()
    shades = re.findall(r'rgba\((\d+,\d+,\d+),([\d.]+)\)" title', page)
    assert len(shades) == 3 + 6  # the response's tokens, then the document's
    assert shades[1] == ("255,140,0", "0.850")  # the largest positive token: full orange
    assert shades[2][0] == "30,110,255"  # negative influence: blue
    assert float(shades[0][1]) < float(shades[2][1]) < float(shades[1][1])
    doc = shades[3:]  # on the document's own scale: its largest |score| is 3
    assert doc[4] == ("255,140,0", "0.850") and doc[1] == ("30,110,255", "0.850")
    assert doc[3][1] == "0.000" and float(doc[0][1]) < float(doc[2][1]) < 0.85
    assert 'title="position 3: 0.5"' in page
    # with the document's tokens, its text is shown through them (escaped), not twice
    assert page.count("&lt;script&gt;") == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path, page: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.html"
    path.write_text(page, encoding="utf-8")
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'prof'}", *args, path.as_uri()],
                          check=True, capture_output=True, text=True, timeout=120)


def _screenshot(tmp_path, page: str) -> np.ndarray:
    from PIL import Image

    shot = tmp_path / f"shot-{len(list(tmp_path.glob('shot-*')))}.png"
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1000,800")
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _strong(img: np.ndarray, color: str) -> np.ndarray:
    """Pixels of a token shaded at full strength (alpha 0.85 over white): orange
    ~(255, 157, 38), blue ~(64, 132, 255); the legend's swatches (alpha 0.6) are lighter."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    if color == "orange":
        return (r > 240) & (g > 140) & (g < 175) & (b < 70)
    return (r > 40) & (r < 90) & (g > 115) & (g < 150) & (b > 240)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_headless_chromium_shades_both_sides(tmp_path):
    shaded = _screenshot(tmp_path, sample_report())
    plain = _screenshot(tmp_path, sample_report(doc_scale=0.0))  # same text, no doc shading
    assert shaded.shape == plain.shape
    colors = np.unique(shaded.reshape(-1, 3), axis=0)
    assert len(colors) > 20  # text and shading, not a blank page
    # the response's strongest token is orange on both pages
    ys = np.nonzero(_strong(plain, "orange").any(1))[0]
    assert ys.size, "no shaded response token on screen"
    # the only pixels that differ are the training example's shaded tokens, below the
    # response, and among them its strongest positive (orange) and negative (blue) tokens
    diff = (shaded != plain).any(2)
    assert diff.any()
    rows = np.nonzero(diff.any(1))[0]
    assert rows.min() > ys.max()
    for color in ("orange", "blue"):
        assert (_strong(shaded, color) & diff).sum() > 20, color
        assert not (_strong(plain, color) & diff).any()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_headless_chromium_parses_untrusted_tokens_as_text(tmp_path):
    dom = _chromium(tmp_path, sample_report(), "--dump-dom").stdout
    assert "<html" in dom and "q&lt;1&gt;" in dom
    # the browser built no element from the document's text: no script, no image
    assert "<script" not in dom and "<img" not in dom
    assert dom.count("&lt;script&gt;alert(\"x\")&lt;/script&gt;") == 1
