"""Dequantize a GGUF file into an HF safetensors folder with transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

from sovereign.offline import apply_offline_env


def gguf_metadata(path: Path) -> dict[str, str]:
    """A few `general.*` fields of a GGUF file (licence, name), read without loading tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, str] = {}
    for key in ("general.license", "general.name", "general.architecture", "general.basename"):
        field = reader.fields.get(key)
        if field is not None and field.types:
            try:
                out[key] = field.contents()
            except Exception:  # an unusual field type: the metadata is informative, not essential
                continue
    return out


def dequantize_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Write config, tokenizer (with chat template) and dequantized weights of `gguf_path` to `out_dir`."""
    apply_offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only even though the environment says offline: huggingface_hub reads that environment once, when
    # first imported, which in a process that imported it earlier was before apply_offline_env. transformers also
    # writes the flag into tokenizer_config.json, so this keeps the imported bytes the same in every process.
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype), local_files_only=True)
    # The weights are plain tensors once dequantized; transformers still marks the model as GGUF-quantized and
    # refuses to save it, so drop that marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
