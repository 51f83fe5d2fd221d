"""``python -m tests.strict_main <grass-llm args>``: the CLI under the strict collectives of
``tests/strict_dist.py`` (how the multi-process tests start every rank)."""

from tests import strict_dist

strict_dist.install()

from grass_llm.cli import app  # noqa: E402  (after the patch, on purpose)

if __name__ == "__main__":
    app(prog_name="grass-llm")
