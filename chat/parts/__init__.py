"""Reading and checking parameter-part files from strangers: one reader per file kind, for every backend.

``gguf`` parses GGUF headers (models, LoRA adapters, control vectors) in milliseconds;
``shape`` describes a base model (from a GGUF header, a Hugging Face config.json or a
loaded model) as the one value every part is checked against; ``lora`` and ``peft`` read
and check LoRA adapters in llama.cpp's GGUF and PEFT's folder format with the same rules;
``vector`` reads control vectors. Both backends and the converters use these, so one file
gets one verdict everywhere. Nothing here imports torch, transformers or llama_cpp.
"""
