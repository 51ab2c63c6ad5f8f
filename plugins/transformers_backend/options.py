"""Load options of the transformers backend: where the weights live and in which precision."""

from pydantic import Field

from chat.backend import BackendOptions


class TransformersOptions(BackendOptions):
    """The common options plus the torch device and dtype (``auto`` picks by the hardware and the checkpoint)."""

    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N, mps")
    dtype: str = Field("auto", description="torch dtype: auto, float32, bfloat16, float16")
