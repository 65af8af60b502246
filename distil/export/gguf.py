"""Hugging Face model directory -> GGUF file that llama.cpp and Ollama load.

The conversion convert_hf_to_gguf.py does for llama / mistral / qwen2 / qwen3 / gemma3 (what differs
per family is the table in ``archs.py``; rope in ``rope.py``), plus the tensor-type recipes of
llama-quantize, in one streaming pass:

1. read config.json and the safetensors headers (``tensors.SafeTensors``: no pickle, no torch);
   check every tensor's shape against the config, which is where a pruned student with layers
   of different widths is caught (llama.cpp needs one width for all layers);
2. write metadata (``{arch}.*`` hyper-parameters, ``general.file_type``) and the tokenizer
   (``vocab.py``);
3. stream the tensors: rename (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``), pick
   the GGML type (``kquants.tensor_type``), and let ``tensors.Encoder`` permute Q/K rows for
   llama's rotary layout, add Gemma's norm offset, and encode them in row chunks, in worker processes for big models;
   append them to the file in order. Peak memory stays near a few quantized tensors.

The file is written under a temporary name in the target directory and renamed at the end, so
an interrupted export never leaves a half-written GGUF under the final name.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.errors import DistilError, crash_point
from distil.export.archs import ARCHITECTURES, Arch, add_arch_metadata, text_config
from distil.export.kquants import FILE_TYPE, QUANT_TYPES, tensor_type
from distil.export.rope import read_rope
from distil.export.tensors import Encoder, SafeTensors, cpus
from distil.export.vocab import add_vocab, read_json_object, read_vocab

_GLOBAL_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_PARALLEL_MIN = 1 << 23  # models with fewer weights are encoded in this process (no fork)


@dataclass
class ExportResult:
    """What ``export_gguf`` wrote: the file, its size, the Modelfile, tensors per GGML type."""

    path: Path
    quant: str
    n_tensors: int
    size_bytes: int
    modelfile: Path | None
    tensor_types: dict[str, int]


# ---------------------------------------------------------------- config and tensor plan


def _number(cfg: dict, key: str, path: Path, default=None, *, integer: bool = True):
    """cfg[key] (or `default` when absent or null), checked: a positive int, or a finite positive number."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise DistilError(f"{path}: {key}: expected {'a positive integer' if integer else 'a number'}, "
                              f"found no such key")
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and 0 < abs(value) < float("inf")
    if isinstance(value, bool) or not ok or value <= 0:
        raise DistilError(f"{path}: {key}: expected {'a positive integer' if integer else 'a positive number'}, "
                          f"found {value!r}")
    return value


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise DistilError(f"{model_dir}: expected a Hugging Face model directory with config.json")
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise DistilError(f"{path}: model_type {model_type!r} ({raw.get('architectures')}) cannot "
                          f"be exported; supported: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    cfg = text_config(raw, path)
    if cfg.get("mlp_bias"):
        raise DistilError(f"{path}: mlp_bias=true is not supported (llama.cpp's llama graph has "
                          f"no FFN biases)")
    n_head, hidden = _number(cfg, "num_attention_heads", path), _number(cfg, "hidden_size", path)
    c = {
        "path": path, "model_type": model_type, "arch": arch, "n_layer": _number(cfg, "num_hidden_layers", path),
        "hidden": hidden, "ffn": _number(cfg, "intermediate_size", path), "n_head": n_head,
        "n_kv": _number(cfg, "num_key_value_heads", path, n_head),
        "head_dim": _number(cfg, "head_dim", path, hidden // n_head),
        "vocab": _number(cfg, "vocab_size", path), "ctx": _number(cfg, "max_position_embeddings", path, 2048),
        "eps": _number(cfg, "rms_norm_eps", path, 1e-6, integer=False),
        "tied": bool(cfg.get("tie_word_embeddings", arch.tied_default)),
        "norm_offset": arch.norm_offset,
        "extra_tensors": {},  # GGUF name -> float32 array computed from the config (rope_freqs)
    }
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not (isinstance(rope, dict) and "full_attention" in rope):  # per-layer-type rope: the family's hook
        theta = _number(cfg, "rope_theta", path, 10000.0, integer=False)
        c["rope"] = read_rope(rope, path, default_theta=float(theta), allowed=arch.rope_types)
    if arch.config is not None:
        arch.config(cfg, c, path)
    if "rope" not in c:
        raise DistilError(f"{path}: rope_parameters: per-layer-type rope is not supported for {model_type}")
    return c


def _gguf_name(hf: str, arch: Arch) -> str | None:
    base, _, suffix = hf.rpartition(".")
    if base in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[base]}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    if m and m.group(2) in arch.layers:
        return f"blk.{m.group(1)}.{arch.layers[m.group(2)]}.{suffix}"
    return None


def _expected_shape(gname: str, c: dict) -> tuple[int, ...]:
    h, q, kv = c["hidden"], c["n_head"] * c["head_dim"], c["n_kv"] * c["head_dim"]
    kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
    weight = {"token_embd": (c["vocab"], h), "output": (c["vocab"], h), "output_norm": (h,),
              "attn_norm": (h,), "ffn_norm": (h,), "post_attention_norm": (h,), "post_ffw_norm": (h,),
              "attn_q_norm": (c["head_dim"],), "attn_k_norm": (c["head_dim"],),
              "rope_freqs": (c["head_dim"] // 2,), "attn_q": (q, h), "attn_k": (kv, h),
              "attn_v": (kv, h), "attn_output": (h, q), "ffn_gate": (c["ffn"], h),
              "ffn_up": (c["ffn"], h), "ffn_down": (h, c["ffn"])}[kind]
    return weight if gname.endswith(".weight") else weight[:1]


def _plan(st: SafeTensors, c: dict) -> list[tuple[str, str]]:
    """(hf_name, gguf_name) in GGUF order; refuses unknown tensors and non-uniform widths."""
    plan, problems = [], []
    arch: Arch = c["arch"]
    for name, array in c["extra_tensors"].items():
        st.add_array(name, array)
    for hf in st.entries:
        canonical = arch.rename(hf) if arch.rename is not None else hf
        if canonical is None or canonical.endswith("rotary_emb.inv_freq") or \
                (c["tied"] and canonical == "lm_head.weight"):
            continue  # not part of the text model / recomputed by llama.cpp / the embedding again
        g = hf if hf in c["extra_tensors"] else _gguf_name(canonical, arch)
        if g is None:
            raise DistilError(f"{c['path'].parent}: unexpected tensor {hf} for a "
                              f"{c['model_type']} model (no GGUF name for it)")
        if g.startswith("blk.") and int(g.split(".")[1]) >= c["n_layer"]:
            raise DistilError(f"{c['path']}: tensor {hf} is past num_hidden_layers={c['n_layer']}")
        want, got = _expected_shape(g, c), st.shape(hf)
        if want != got:
            problems.append(f"{hf} is {list(got)}, config implies {list(want)}")
        plan.append((hf, g))
    if problems:
        raise DistilError(
            f"{c['path'].parent}: tensor shapes do not match config.json ({len(problems)} "
            f"tensors, e.g. {problems[0]}); layers with different widths after pruning cannot be "
            f"loaded by llama.cpp (one head count and FFN width for all layers): prune uniformly "
            f"or fix config.json")
    names = {g for _, g in plan}
    need = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(c["n_layer"])
        for t in arch.required}
    if not c["tied"]:
        need.add("output.weight")
    if missing := sorted(need - names):
        raise DistilError(f"{c['path'].parent}: missing tensors {missing[:3]} "
                          f"({len(missing)} in all) for a {c['n_layer']}-layer model")
    order = {"rope_freqs": -1, "token_embd": 0, "output_norm": 1, "output": 2}

    def key(item):  # global tensors first, then layer by layer: llama.cpp's own order
        g = item[1]
        return (int(g.split(".")[1]), g) if g.startswith("blk.") else (-1, str(order[g[:g.index(".")]]))

    return sorted(plan, key=key)


# ---------------------------------------------------------------- the writer


def _add_metadata(w, c: dict, quant: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(FILE_TYPE[quant])
    w.add_quantization_version(2)
    w.add_block_count(c["n_layer"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_kv"])
    w.add_layer_norm_rms_eps(float(c["eps"]))
    w.add_vocab_size(c["vocab"])
    w.add_rope_dimension_count(c["head_dim"])
    if c["head_dim"] * c["n_head"] != c["hidden"] or c["arch"].head_dim_keys:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    add_arch_metadata(w, c["arch"], c)


def _add_tensor_infos(w, st: SafeTensors, plan, types) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for (hf, g), qt in zip(plan, types):
        shape = st.shape(hf)
        if qt in ("F32", "F16"):
            dtype = np.dtype(np.float32 if qt == "F32" else np.float16)
            w.add_tensor_info(g, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:  # quantized: the payload is uint8 rows of blocks
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qt]]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(g, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              GGMLQuantizationType[qt])


def _temp_prefix(out_path: Path) -> str:
    """Temporary files of an export to OUT are `.OUT.<pid>.<random>.tmp` beside it (hidden, and only renamed to
    OUT once complete)."""
    return f".{out_path.name}."


def _remove_stale_temps(out_path: Path) -> None:
    """Remove what exports to this same path that were killed (kill -9, power loss) left behind: temporary files
    whose process no longer runs. A temp file of a live export (another process) is left alone."""
    prefix = _temp_prefix(out_path)
    for p in out_path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit():
            continue  # not a name this exporter makes
        if int(pid) != os.getpid():  # our own pid on a file we have not made: a dead process had it before us
            try:
                os.kill(int(pid), 0)
                continue  # alive: maybe exporting to this path right now
            except PermissionError:
                continue  # alive, another user's
            except (ProcessLookupError, OverflowError):
                pass  # no such process (or no such pid at all)
        p.unlink(missing_ok=True)


def _check_special_files(model_dir: Path) -> None:
    """The files gguf-py's SpecialVocab reads besides tokenizer.json, checked before anything is written."""
    for name in ("tokenizer_config.json", "chat_template.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            read_json_object(model_dir / name)
    for name in ("chat_template.jinja", "merges.txt"):
        path = model_dir / name
        if path.is_file():
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise DistilError(f"{path}: expected UTF-8 text, found undecodable bytes") from None


def export_gguf(model_dir, out_path, quant: str = "Q4_K_M", *, modelfile: bool = True,
                name: str | None = None, pre_tokenizer: str | None = None,
                workers: int | None = None) -> ExportResult:
    """Write the HF model in ``model_dir`` as a ``quant`` GGUF at ``out_path``.

    ``quant`` is one of ``QUANT_TYPES``; ``name`` goes to ``general.name`` (default: the
    directory's name); ``pre_tokenizer`` overrides the llama.cpp pre-tokenizer name for BPE
    tokenizers the exporter cannot identify. With ``modelfile`` an Ollama Modelfile is written
    next to the GGUF (``OUT.Modelfile``). ``workers``: encoding processes (default: one per CPU
    on Linux for models of 8M+ weights, else 1, i.e. in this process). Raises DistilError for
    bad input; never leaves a partial file, and an existing ``out_path`` is only ever replaced
    by a complete one.
    """
    from gguf import GGUFWriter

    from distil.export.ollama import write_modelfile

    if quant not in QUANT_TYPES:
        raise DistilError(f"quant type {quant!r} does not exist; expected one of: "
                          f"{', '.join(QUANT_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not model_dir.is_dir():
        raise DistilError(f"{model_dir}: model directory not found")
    if not out_path.parent.is_dir():
        what = "is not a directory" if out_path.parent.exists() else "does not exist"
        raise DistilError(f"{out_path}: output directory {out_path.parent} {what}")
    if out_path.is_dir():
        raise DistilError(f"{out_path}: expected a .gguf file path, found a directory")
    c = _config(model_dir)
    arch: Arch = c["arch"]
    permute = arch.permute_qk
    st = SafeTensors(model_dir)
    plan = _plan(st, c)
    vocab = read_vocab(model_dir, c["vocab"], pre_tokenizer)
    _check_special_files(model_dir)
    types = [tensor_type(g, st.shape(hf), quant, c["n_layer"], c["tied"]) for hf, g in plan]
    if workers is None:
        big = sum(int(np.prod(st.shape(hf))) for hf, _ in plan) >= _PARALLEL_MIN
        workers = cpus() if big and sys.platform == "linux" else 1

    _remove_stale_temps(out_path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(out_path)}{os.getpid()}.", suffix=".tmp",
                                   dir=out_path.parent)
    except OSError as exc:  # a read-only directory, a full disk
        raise DistilError(f"{out_path}: cannot write in {out_path.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    crash_point("export:temp-created")
    w, encoder = None, None
    try:
        w = GGUFWriter(tmp, arch.gguf)
        encoder = Encoder([(st, hf, g, qt, c, permute) for (hf, g), qt in zip(plan, types)], workers)
        _add_metadata(w, c, quant, name or model_dir.name)
        info = add_vocab(w, model_dir, vocab, c["vocab"])
        _add_tensor_infos(w, st, plan, types)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, data in enumerate(encoder):
            w.write_tensor_data(data)
            crash_point(f"export:tensor-{i}")
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        crash_point("export:before-rename")
        os.replace(tmp, out_path)  # atomic: the final name only ever holds a complete file
    except BaseException as exc:
        if w is not None:
            w.close()
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (tmp, str(out_path)):
            raise DistilError(f"{out_path}: cannot write the GGUF ({exc.strerror or exc})") from None
        raise
    finally:
        if encoder is not None:
            encoder.close()
    crash_point("export:after-rename")
    mf = None
    if modelfile:
        mf = write_modelfile(out_path, info["chat_template"], eos=info["eos"])
    return ExportResult(out_path, quant, len(plan), out_path.stat().st_size, mf,
                        dict(Counter(types)))
