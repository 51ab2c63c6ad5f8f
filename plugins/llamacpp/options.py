"""What `chat -m model.gguf` can be told at load time, beyond the options every backend takes."""

from pydantic import Field

from chat.backend import BackendOptions


class LlamaCppOptions(BackendOptions):
    """llama.cpp's load options: the common ones, and how many layers go to the GPU."""

    gpu_layers: int = Field(0, ge=-1, description="layers to offload to the GPU; -1 = all (needs a GPU build)")
