"""What differs between the exported architectures, as one table: HF model_type -> ``Arch``.

Every family shares the llama skeleton (token_embd, blk.N.{attn,ffn}_*, output_norm, output); an
``Arch`` says what a family adds to it, following llama.cpp's own converter:

* llama / mistral: Q and K rows permuted for llama.cpp's NORM rope; Llama 3.x ``llama3`` rope
  scaling becomes a ``rope_freqs`` tensor (``rope.py``).
* qwen2: NEOX rope (no permutation), q/k/v biases.
* qwen3: qwen2 without biases, plus per-head RMS norms of Q and K (``attn_q_norm``/``attn_k_norm``).
* gemma3 (``gemma3_text``; a multimodal ``gemma3`` checkpoint exports its text model): four norms
  per layer (pre/post attention, pre/post FFN), Q/K norms, GELU(tanh) FFN, embeddings scaled by
  sqrt(hidden) *inside* llama.cpp (so the file holds them unscaled, as HF does), and every RMSNorm
  computes x * (1 + w) in HF but x * w in llama.cpp: the file stores w + 1. Local (sliding window)
  layers use their own rope base (``rope.freq_base_swa``); which layers are local is written as
  a per-layer pattern, so a depth-pruned student keeps its own mix of local and global layers.

``config`` hooks read and check the family's own config keys into the exporter's config dict
``c`` (refusing what llama.cpp's graph for that architecture cannot run); ``metadata`` hooks
write the family's own GGUF keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distil.errors import DistilError
from distil.export.rope import Rope, positive_number, add_rope_metadata, llama3_factors, read_rope

_DENSE = {  # HF name inside model.layers.N -> GGUF name inside blk.N (the llama skeleton)
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GEMMA3 = {**_DENSE, **_QK_NORM, "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name (general.architecture)
    layers: dict[str, str] = field(default_factory=lambda: dict(_DENSE))
    permute_qk: bool = False  # HF rotate-half Q/K rows -> llama.cpp NORM rope's interleaved pairs
    tied_default: bool = False  # tie_word_embeddings when config.json does not say
    norm_offset: float = 0.0  # added to every *norm.weight when written
    rope_types: tuple[str, ...] = ("default", "linear")
    config: Callable[[dict, dict, Path], None] | None = None
    metadata: Callable[[Any, dict], None] | None = None
    rename: Callable[[str], str | None] | None = None  # checkpoint name -> model.* name, None = not exported
    head_dim_keys: bool = False  # always write attention.key_length / value_length (configs with head_dim)

    @property
    def required(self) -> tuple[str, ...]:
        """GGUF names (inside blk.N) of the weights every layer must have."""
        return tuple(dict.fromkeys(self.layers.values()))


# ---------------------------------------------------------------- family hooks


def _flag(cfg: dict, key: str, path: Path, why: str) -> None:
    if cfg.get(key):
        raise DistilError(f"{path}: {key}={cfg[key]!r} is not supported for {cfg.get('model_type')} "
                          f"export ({why})")


def _qwen3_config(cfg: dict, c: dict, path: Path) -> None:
    _flag(cfg, "attention_bias", path, "llama.cpp's qwen3 graph has no attention biases")
    _flag(cfg, "use_sliding_window", path, "llama.cpp's qwen3 graph has no sliding window")


def _llama_config(cfg: dict, c: dict, path: Path) -> None:
    if c["rope"].type == "llama3":  # an extra tensor the converter writes: rope_freqs.weight
        c["extra_tensors"]["rope_freqs.weight"] = llama3_factors(c["rope"], c["head_dim"])


def _gemma3_config(cfg: dict, c: dict, path: Path) -> None:
    """Gemma 3's own keys, checked against what llama.cpp's gemma3 graph computes."""
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise DistilError(f"{path}: hidden_activation: expected 'gelu_pytorch_tanh' (llama.cpp's gemma3 "
                          f"FFN is GELU with the tanh approximation), found {act!r}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise DistilError(f"{path}: {key}: expected null (llama.cpp's gemma3 graph has no soft-capping), "
                              f"found {cfg[key]!r}")
    _flag(cfg, "use_bidirectional_attention", path, "llama.cpp runs gemma3 as a causal LM")
    _flag(cfg, "attention_bias", path, "llama.cpp's gemma3 graph has no attention biases")
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B);
    # HF by query_pre_attn_scalar^-1/2: they must agree
    scalar = cfg.get("query_pre_attn_scalar", 256)
    want = c["hidden"] / c["n_head"] if c["n_layer"] == 62 else c["head_dim"]
    if not isinstance(scalar, (int, float)) or not math.isclose(scalar, want):
        raise DistilError(f"{path}: query_pre_attn_scalar: expected {want:g} (llama.cpp scales gemma3 "
                          f"queries by 1/sqrt of it for this shape), found {scalar!r}")
    # which layers attend through the sliding window
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        period = int(positive_number(cfg, "sliding_window_pattern", path, "", 6))
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(c["n_layer"])]
    if not isinstance(types, list) or len(types) != c["n_layer"] or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        raise DistilError(f"{path}: layer_types: expected {c['n_layer']} entries of 'sliding_attention' / "
                          f"'full_attention' (num_hidden_layers), found {str(types)[:120]}")
    swa = [t == "sliding_attention" for t in types]
    if any(swa) and not (isinstance(window, int) and not isinstance(window, bool) and window > 0):
        raise DistilError(f"{path}: sliding_window: expected a positive integer for the sliding_attention "
                          f"layers, found {window!r}")
    c["swa"], c["window"] = swa, window
    # rope: per layer type (transformers 5), or rope_theta / rope_local_base_freq / rope_scaling (4.x)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = read_rope(params.get("full_attention"), path, default_theta=1e6, allowed=("default", "linear"),
                         where="rope_parameters.full_attention.")
        local = read_rope(params.get("sliding_attention"), path, default_theta=1e4, allowed=("default",),
                          where="rope_parameters.sliding_attention.")
    else:
        full = read_rope(params or cfg.get("rope_scaling"), path, default_theta=positive_number(cfg, "rope_theta", path, "", 1e6),
                         allowed=("default", "linear"))
        local = Rope(positive_number(cfg, "rope_local_base_freq", path, "", 1e4))
    c["rope"], c["rope_local"] = full, local


def _gemma3_metadata(w, c: dict) -> None:
    if any(c["swa"]):
        w.add_sliding_window(c["window"])
        w.add_sliding_window_pattern(c["swa"])  # per layer: True = sliding window
        w.add_rope_freq_base_swa(c["rope_local"].theta)


def _gemma3_rename(name: str) -> str | None:
    """A multimodal Gemma 3 checkpoint: its language model's tensors, under the text model's names."""
    for prefix, to in (("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return to + name[len(prefix):]
    if name.startswith(("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                        "multi_modal_projector.")):
        return None  # the image encoder: llama.cpp keeps it in a separate mmproj file
    return name


_GEMMA3_ARCH = Arch("gemma3", dict(_GEMMA3), tied_default=True, norm_offset=1.0, config=_gemma3_config,
                    metadata=_gemma3_metadata, head_dim_keys=True)

#: HF model_type -> Arch. Mistral is a llama graph (llama.cpp's converter writes it as "llama").
ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True, rope_types=("default", "linear", "llama3"), config=_llama_config),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", {**_DENSE, **_QK_NORM}, config=_qwen3_config, head_dim_keys=True),
    "gemma3_text": _GEMMA3_ARCH,
    "gemma3": dataclasses.replace(_GEMMA3_ARCH, rename=_gemma3_rename),
}


def text_config(cfg: dict, path: Path) -> dict:
    """The language model's config: ``text_config`` of a multimodal ``gemma3`` checkpoint, else ``cfg``."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise DistilError(f"{path}: text_config: expected the language model's config object for a "
                          f"multimodal gemma3 checkpoint, found {str(text)[:60]}")
    out = dict(text)
    out.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    out["model_type"] = "gemma3"
    return out


def add_arch_metadata(w, arch: Arch, c: dict) -> None:
    add_rope_metadata(w, c["rope"])
    if arch.metadata is not None:
        arch.metadata(w, c)
