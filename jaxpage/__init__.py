"""jaxpage: a vLLM-class LLM serving engine on JAX/XLA."""

import logging as _logging

from jaxpage.sampling_params import (BeamSearchParams, PoolingParams, SamplingParams,
                                     StructuredOutputsParams)
from jaxpage.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput

__version__ = "0.1.0"

# Like vLLM, say at INFO what start-up decided (KV pool size, compiled buckets) unless the
# application configured the "jaxpage" logger itself.
_logger = _logging.getLogger("jaxpage")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("[jaxpage] %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False


def __getattr__(name):  # LLM pulls in jax; import it lazily so `jaxpage.engine` stays jax-free
    if name == "LLM":
        from jaxpage.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "PoolingParams", "EmbeddingOutput", "EmbeddingRequestOutput"]
