"""Hugging Face PEFT adapter files, both ways, and name-map presets.

:func:`export_peft` writes ``adapter_model.safetensors`` + ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads; :func:`import_peft` reads one back onto a base.
:mod:`~lorax_fn.peft.presets` maps Flax paths to Hugging Face module names.
"""

from lorax_fn.peft import presets
from lorax_fn.peft.io import export_peft, import_peft
from lorax_fn.peft.presets import tunix_llama3_name_map, tunix_qwen3_name_map

__all__ = [
    "export_peft",
    "import_peft",
    "presets",
    "tunix_llama3_name_map",
    "tunix_qwen3_name_map",
]
