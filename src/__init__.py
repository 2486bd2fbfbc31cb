"""The seed's import paths (`from src.models.hybrid_llama import HybridLlamaConfig`), kept so
its scripts import unchanged from the repository root; the code lives in apps/main."""
