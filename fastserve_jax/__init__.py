"""fastserve-jax: FastServe-style preemptive LLM serving on JAX/XLA."""

from fastserve_jax.config import EngineConfig, SamplingParams
from fastserve_jax.engine import LLMEngine, RequestOutput
from fastserve_jax.llm import LLM
from models import demo_model_path

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "demo_model_path"]
