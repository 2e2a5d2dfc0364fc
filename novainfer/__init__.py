"""novainfer: a small, fast LLM inference engine with vLLM's API."""

from novainfer.llm import LLM
from novainfer.lora.request import LoRARequest
from novainfer.outputs import CompletionOutput, Logprob, RequestOutput
from novainfer.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "LoRARequest",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
