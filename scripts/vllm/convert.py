"""Turn SmolLM2's Q4_1 GGUF into a Hugging Face folder that vLLM's CPU build can serve.

vLLM 0.32 cannot load a GGUF file on the CPU (core vLLM reads it as a config folder; the GGUF
plugin's kernels need CUDA), so transformers reads it instead: the weights dequantised to
float32, the config and tokenizer rebuilt from the file's metadata. The quantisation markers
transformers leaves on the model are cleared, or ``save_pretrained`` would describe the plain
weights it writes as GGUF-quantised and vLLM would refuse them.

    python convert.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
