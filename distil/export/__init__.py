"""Export a Hugging Face model directory to GGUF (llama.cpp / Ollama), with native k-quants.

    from distil.export import export_gguf
    result = export_gguf("runs/demo/student", "runs/demo/export/student.gguf", "Q4_K_M")

``gguf.py`` writes the file (config, metadata, tensor names), ``archs.py`` is the table of what
each architecture (llama, mistral, qwen2, qwen3, gemma3) adds, ``rope.py`` the rope keys and Llama 3's
rope_freqs, ``tensors.py`` reads safetensors
and encodes each tensor, ``kquants.py`` holds the Q4_K/Q5_K/Q6_K quantizers and the Q4_K_M /
Q5_K_M tensor-type rules, ``vocab.py`` the tokenizer, ``ollama.py`` the Modelfile.
"""

from distil.export.gguf import ARCHITECTURES, ExportResult, export_gguf
from distil.export.kquants import QUANT_TYPES
from distil.export.ollama import write_modelfile

__all__ = ["ARCHITECTURES", "QUANT_TYPES", "ExportResult", "export_gguf", "write_modelfile"]
