"""jaxpage: a vLLM-class LLM serving engine on JAX/XLA."""

from jaxpage.sampling_params import SamplingParams
from jaxpage.outputs import CompletionOutput, RequestOutput

__version__ = "0.1.0"


def __getattr__(name):  # LLM pulls in jax; import it lazily so `jaxpage.engine` stays jax-free
    if name == "LLM":
        from jaxpage.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
