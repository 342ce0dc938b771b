"""Name maps for :func:`lorax_fn.export_peft` / :func:`lorax_fn.import_peft`, per architecture.

A preset turns the Flax paths of a model into the PyTorch module names that Hugging Face
``transformers`` gives the same architecture, so a LoRA tree trained in JAX loads with
``peft.PeftModel.from_pretrained`` (and an adapter from the Hub imports) without
hand-written regular expressions. The PyTorch side of each preset is fixed by the
architecture; the Flax side is parameterised, because Flax ports name things
differently. Each preset returns ``[(regex, template), ...]`` rules: the first rule that
fully matches a leaf path names its module.

Layer paths take ``{i}`` where the layer number appears (``"params/layers_{i}"`` for
modules named ``layers_0, layers_1, …``; ``"params/model/layers/{i}"`` for a dict keyed
by number). A path without ``{i}`` is one ``nn.scan`` stack: its weights carry a leading
layer axis and are named per layer through export_peft's ``{layer}`` placeholder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lorax_fn.errors import LoraError
from lorax_fn.peft.io import NameMap, _module_name

Rules = list[tuple[str, str]]

LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
GPT2_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

_LEAF = r"/[^/]+"  # the parameter itself: kernel, bias, scale, embedding, ...


def module_name(name_map: NameMap, path: str) -> str | None:
    """The PyTorch module ``name_map`` gives the Flax leaf ``path`` (``None``: unmapped).

    What :func:`lorax_fn.export_peft` and :func:`lorax_fn.import_peft` will use: handy to
    check a preset against a model's paths before exporting.

    Example:
        >>> module_name(llama_name_map(), "params/layers_3/self_attn/q_proj/kernel")
        'model.layers.3.self_attn.q_proj'
        >>> module_name(llama_name_map(), "params/elsewhere/kernel") is None
        True
    """
    return _module_name(name_map, path)


def _segment(value: object, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^/{}]+", value):
        raise LoraError(
            f"{what} must be one Flax module name (no '/', '{{' or '}}'), got {value!r}"
        )
    return value


def _path(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or value.startswith("/") or value.endswith("/"):
        raise LoraError(f"{what} must be a Flax path like 'params/norm', got {value!r}")
    return value


def _layer_rules(layers: object, hf_layers: str) -> tuple[str, str]:
    """The regex of one layer's Flax path and the template of its PyTorch name."""
    layers = _path(layers, "layers")
    pieces = layers.split("{i}")
    if len(pieces) > 2 or any(c in piece for piece in pieces for c in "{}"):
        raise LoraError(
            f"layers must contain '{{i}}' at most once (per-layer modules) or not at all "
            f"(one nn.scan stack), and no other braces; got {layers!r}"
        )
    if len(pieces) == 1:
        return re.escape(layers), f"{hf_layers}.{{layer}}"
    return r"(?P<i>\d+)".join(map(re.escape, pieces)), rf"{hf_layers}.\g<i>"


def _renames(names: Mapping[str, str] | None, known: tuple[str, ...]) -> dict[str, str]:
    names = dict(names or {})
    if unknown := sorted(set(names) - set(known)):
        raise LoraError(f"names: unknown modules {unknown}; known: {list(known)}")
    return {hf: _segment(names.get(hf, hf.split(".")[1]), f"names[{hf!r}]") for hf in known}


def _decoder_rules(
    layers: object,
    hf_layers: str,
    blocks: Mapping[str, object],
    names: Mapping[str, str] | None,
    known: tuple[str, ...],
    extra: Mapping[str, object],
) -> Rules:
    layer, hf_layer = _layer_rules(layers, hf_layers)
    flax_blocks = {hf: _segment(flax, hf) for hf, flax in blocks.items()}
    renames = _renames(names, known)
    rules: Rules = []
    for hf in known:
        block, module = hf.split(".")
        flax = f"{layer}/{re.escape(flax_blocks[block])}/{re.escape(renames[hf])}{_LEAF}"
        rules.append((flax, f"{hf_layer}.{block}.{module}"))
    # Anything else in a block or a layer (norms, biases, q_norm …) keeps its name.
    for hf_block, flax_block in flax_blocks.items():
        rules.append(
            (
                rf"{layer}/{re.escape(flax_block)}/(?P<m>[^/]+){_LEAF}",
                rf"{hf_layer}.{hf_block}.\g<m>",
            )
        )
    rules.append((rf"{layer}/(?P<m>[^/]+){_LEAF}", rf"{hf_layer}.\g<m>"))
    for hf, flax in extra.items():
        if flax is not None:
            rules.append((re.escape(_path(flax, hf)) + _LEAF, hf))
    return rules


def llama_name_map(
    *,
    layers: str = "params/layers_{i}",
    attn: str = "self_attn",
    mlp: str = "mlp",
    embed: str | None = "params/embed_tokens",
    norm: str | None = "params/norm",
    head: str | None = "params/lm_head",
    names: Mapping[str, str] | None = None,
) -> Rules:
    r"""PEFT names for Llama-style decoders: Llama, Mistral, Qwen2/3, Gemma, ….

    The PyTorch modules (``LlamaForCausalLM`` and its relatives) and the Flax paths they
    are read from, with the defaults (those of ``examples/serve.py``):

    ==========================================  ==============================================
    Flax leaf path                              PyTorch module
    ==========================================  ==============================================
    ``{layers}/{attn}/q_proj/*``                ``model.layers.{i}.self_attn.q_proj`` (also
                                                ``k_proj``, ``v_proj``, ``o_proj``)
    ``{layers}/{mlp}/gate_proj/*``              ``model.layers.{i}.mlp.gate_proj`` (also
                                                ``up_proj``, ``down_proj``)
    ``{layers}/{attn}/X/*``, ``{mlp}/X/*``      ``model.layers.{i}.self_attn.X`` / ``mlp.X``
    ``{layers}/X/*`` (norms)                    ``model.layers.{i}.X``
    ``{embed}/*``, ``{norm}/*``, ``{head}/*``   ``model.embed_tokens``, ``model.norm``,
                                                ``lm_head``
    ==========================================  ==============================================

    ``*`` is the parameter (``kernel``, ``bias``, ``scale``, ``embedding``). ``names``
    renames Flax projections, keyed by PyTorch name relative to the layer, e.g.
    ``{"self_attn.q_proj": "wq"}``; ``embed``/``norm``/``head=None`` leave those out.
    Hugging Face's own Flax port (``FlaxLlamaForCausalLM``) is
    ``llama_name_map(layers="params/model/layers/{i}", embed="params/model/embed_tokens",
    norm="params/model/norm")``; a scanned stack is e.g. ``layers="params/layers"``.
    Flax ``Dense`` kernels are ``(in, out)``, PyTorch ``Linear`` weights ``(out, in)``:
    :func:`lorax_fn.export_peft` transposes.

    Example:
        >>> rules = llama_name_map()
        >>> module_name(rules, "params/layers_0/post_attention_layernorm/scale")
        'model.layers.0.post_attention_layernorm'
        >>> module_name(llama_name_map(layers="params/layers"), "params/layers/mlp/up_proj/kernel")
        'model.layers.{layer}.mlp.up_proj'
    """
    return _decoder_rules(
        layers,
        "model.layers",
        {"self_attn": attn, "mlp": mlp},
        names,
        LLAMA_PROJECTIONS,
        {"model.embed_tokens": embed, "model.norm": norm, "lm_head": head},
    )


def gpt2_name_map(
    *,
    layers: str = "params/h_{i}",
    attn: str = "attn",
    mlp: str = "mlp",
    embed: str | None = "params/wte",
    positions: str | None = "params/wpe",
    norm: str | None = "params/ln_f",
    names: Mapping[str, str] | None = None,
) -> Rules:
    r"""PEFT names for GPT-2 (``GPT2LMHeadModel``; the output head is tied to ``wte``).

    ========================================  ==============================================
    Flax leaf path                            PyTorch module
    ========================================  ==============================================
    ``{layers}/{attn}/c_attn/*``              ``transformer.h.{i}.attn.c_attn`` (also
                                              ``c_proj``)
    ``{layers}/{mlp}/c_fc/*``                 ``transformer.h.{i}.mlp.c_fc`` (also ``c_proj``)
    ``{layers}/{attn}/X/*``, ``{mlp}/X/*``    ``transformer.h.{i}.attn.X`` / ``mlp.X``
    ``{layers}/X/*`` (``ln_1``, ``ln_2``)     ``transformer.h.{i}.X``
    ``{embed}/*``, ``{positions}/*``,         ``transformer.wte``, ``transformer.wpe``,
    ``{norm}/*``                              ``transformer.ln_f``
    ========================================  ==============================================

    ``names`` renames Flax projections, keyed ``"attn.c_attn"``, ``"attn.c_proj"``,
    ``"mlp.c_fc"``, ``"mlp.c_proj"``. Hugging Face's Flax port (``FlaxGPT2LMHeadModel``) is
    ``gpt2_name_map(layers="params/transformer/h/{i}", embed="params/transformer/wte",
    positions="params/transformer/wpe", norm="params/transformer/ln_f")``; its Conv1D
    kernels are stored ``(out, in)``, so split it with
    ``LoraSpec(layouts={"**/kernel": Layout(in_axes=(1,), out_axes=(0,))})``.

    PyTorch's GPT-2 uses ``Conv1D`` (weight ``(in, out)``), not ``Linear``. PEFT keeps
    ``lora_A [r, in]`` / ``lora_B [out, r]`` for it and sets ``fan_in_fan_out`` itself
    when it loads the adapter, so exported LoRA factors load as they are; a fully trained
    Conv1D leaf (``modules_to_save``) would need export_peft to skip its transpose.

    Example:
        >>> module_name(gpt2_name_map(), "params/h_11/mlp/c_proj/kernel")
        'transformer.h.11.mlp.c_proj'
    """
    return _decoder_rules(
        layers,
        "transformer.h",
        {"attn": attn, "mlp": mlp},
        names,
        GPT2_PROJECTIONS,
        {"transformer.wte": embed, "transformer.wpe": positions, "transformer.ln_f": norm},
    )


def _prefixed(prefix: object, path: str) -> str:
    prefix = "" if prefix == "" else _path(prefix, "prefix")
    return f"{prefix}/{path}" if prefix else path


def tunix_llama3_name_map(*, prefix: str = "") -> Rules:
    r"""PEFT names for Tunix's NNX Llama3 (``tunix.models.llama3.model.Llama3``).

    Tunix keeps attention weights as einsum kernels named ``w``: ``q_proj/w``
    ``(d, heads, head_dim)``, ``k_proj/w`` and ``v_proj/w`` ``(d, kv_heads, head_dim)``,
    ``o_proj/w`` ``(heads, head_dim, d)``. Split with their layouts (``split(...,
    fn=..., example_args=...)``, or ``layouts=lorax_fn.infer_layouts(...)``) and
    :func:`lorax_fn.export_peft` flattens each to the ``Linear`` Hugging Face has
    (``heads·head_dim`` rows, head-major, as ``LlamaForCausalLM`` stores them);
    :func:`lorax_fn.import_peft` reshapes back.

    ==========================================  ========================================
    Path in ``nnx.split(model)``'s state        PyTorch module
    ==========================================  ========================================
    ``layers/{i}/attn/q_proj/w``                ``model.layers.{i}.self_attn.q_proj``
                                                (also ``k_proj``, ``v_proj``, ``o_proj``)
    ``layers/{i}/mlp/gate_proj/kernel``         ``model.layers.{i}.mlp.gate_proj`` (also
                                                ``up_proj``, ``down_proj``)
    ``layers/{i}/input_layernorm/w``            ``model.layers.{i}.input_layernorm``
    ``embedder/input_embedding``                ``model.embed_tokens``
    ``final_norm/w``, ``lm_head/w``             ``model.norm``, ``lm_head``
    ==========================================  ========================================

    ``prefix`` is prepended to every path, for a Tunix model held inside a module of your
    own (``prefix="llm"`` for ``llm/layers/{i}/…``).

    Example:
        >>> module_name(tunix_llama3_name_map(), "layers/3/attn/q_proj/w")
        'model.layers.3.self_attn.q_proj'
        >>> module_name(tunix_llama3_name_map(), "embedder/input_embedding")
        'model.embed_tokens'
    """
    return llama_name_map(
        layers=_prefixed(prefix, "layers/{i}"),
        attn="attn",
        mlp="mlp",
        embed=_prefixed(prefix, "embedder"),
        norm=_prefixed(prefix, "final_norm"),
        head=_prefixed(prefix, "lm_head"),
    )


def tunix_qwen3_name_map(*, prefix: str = "") -> Rules:
    r"""PEFT names for Tunix's NNX Qwen3, dense or mixture-of-experts (``Qwen3``).

    The paths of :func:`tunix_llama3_name_map` (Qwen3's ``q_norm``/``k_norm`` keep their
    names), and for a MoE layer (``ModelConfig(num_experts=...)``):

    ==========================================  ========================================
    Path in ``nnx.split(model)``'s state        PyTorch module
    ==========================================  ========================================
    ``layers/{i}/mlp/gate_proj``                ``model.layers.{i}.mlp.experts.{e}.``
    ``(experts, d, hidden)``                    ``gate_proj``, one per expert ``e`` (also
                                                ``up_proj``, ``down_proj``)
    ``layers/{i}/mlp/router/kernel``            ``model.layers.{i}.mlp.gate``
    ==========================================  ========================================

    Expert weights are named per expert through export_peft's ``{layer}`` placeholder
    (the expert axis is their one batch axis), which writes one ``Linear`` adapter per
    expert, ``lora_A`` ``[r, d]``: the layout of Hugging Face's per-expert checkpoints,
    which PEFT (0.21 and later, with transformers 5) converts on load into the fused
    ``experts.gate_up_proj``/``down_proj`` parameters of ``Qwen3MoeForCausalLM`` (gate
    and up become one rank-2r adapter, block-diagonal, so the update is the same).
    Target ``gate_proj`` and ``up_proj`` together, with one rank and alpha: PEFT fuses
    their adapters. Do not pass ``experts=`` to export_peft with this preset: that writes
    ``target_parameters`` of one Flax weight each, and ``Qwen3MoeForCausalLM`` has no
    separate ``gate_proj``/``up_proj`` parameters.

    Example:
        >>> module_name(tunix_qwen3_name_map(), "layers/0/mlp/up_proj")
        'model.layers.0.mlp.experts.{layer}.up_proj'
        >>> module_name(tunix_qwen3_name_map(), "layers/0/attn/k_norm/w")
        'model.layers.0.self_attn.k_norm'
    """
    layer, hf_layer = _layer_rules(_prefixed(prefix, "layers/{i}"), "model.layers")
    moe: Rules = [
        (
            rf"{layer}/mlp/(?P<p>gate_proj|up_proj|down_proj)",
            rf"{hf_layer}.mlp.experts.{{layer}}.\g<p>",
        ),
        (rf"{layer}/mlp/router{_LEAF}", rf"{hf_layer}.mlp.gate"),
    ]
    return moe + tunix_llama3_name_map(prefix=prefix)
