"""vLLM integration: the general plugin (entry point ``tensorlog.integrations.vllm:register``) and the launcher."""

from .plugin import register

__all__ = ["register"]
