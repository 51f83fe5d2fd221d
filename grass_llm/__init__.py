"""grass_llm: scalable data attribution for LLMs with GraSS / FactGraSS gradient compression."""

__version__ = "0.1.0"
