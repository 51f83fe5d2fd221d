"""``python -m grass_llm`` (what ``accelerate launch -m grass_llm`` runs)."""

from grass_llm.cli import app

app()
