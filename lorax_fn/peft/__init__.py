"""Hugging Face PEFT adapter files, both ways, and name-map presets.

:func:`export_peft` writes ``adapter_model.safetensors`` + ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads; :func:`import_peft` reads one back onto a base.
:mod:`~lorax_fn.peft.presets` maps Flax paths to Hugging Face module names. Layer subsets
(PEFT's ``layers_to_transform``) and trainable tokens (``trainable_token_indices``) have
their own writers and readers: :func:`export_layers` / :func:`import_layers`,
:func:`export_tokens` / :func:`import_tokens`.
"""

from lorax_fn.peft import presets
from lorax_fn.peft.io import export_peft, import_peft
from lorax_fn.peft.presets import tunix_llama3_name_map, tunix_qwen3_name_map
from lorax_fn.peft.subsets import export_layers, import_layers
from lorax_fn.peft.tokens import export_tokens, import_tokens

__all__ = [
    "export_layers",
    "export_peft",
    "export_tokens",
    "import_layers",
    "import_peft",
    "import_tokens",
    "presets",
    "tunix_llama3_name_map",
    "tunix_qwen3_name_map",
]
