"""Ollama Modelfile next to an exported GGUF.

Ollama guesses a chat template from the GGUF's jinja template and sometimes guesses wrong, so
the Modelfile states it: ``TEMPLATE`` in Ollama's Go text/template syntax (``.System``,
``.Messages``, ``.Prompt``, ``.Response``), the ``stop`` strings that end a turn, and the
default system prompt when the jinja template hard-codes one (SmolLM2's does). Recognised
template families: ChatML (SmolLM2, Qwen 2/3), Llama 3 headers, Gemma turns (``<start_of_turn>``,
no system role: a system prompt opens the first user turn, as Gemma's own template does) and
Llama 2 / Mistral ``[INST]``.
A model without a chat template gets a plain completion template.

Use it with ``ollama create NAME -f OUT.Modelfile`` (the file sits next to ``OUT.gguf``).
"""

from __future__ import annotations

import re
from pathlib import Path

_CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}'''

_LLAMA3 = '''{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}'''

_INST = '''{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}'''

_GEMMA = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ else }}<start_of_turn>user
{{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}'''

_FAMILIES = [  # (marker in the jinja template, Go template, stop strings)
    ("<|im_start|>", _CHATML, ["<|im_start|>", "<|im_end|>"]),
    ("<|start_header_id|>", _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("<start_of_turn>", _GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
    ("[INST]", _INST, ["[INST]", "[/INST]", "</s>"]),
]


def template_family(chat_template: str | None) -> tuple[str, list[str]] | None:
    """(Go template, stop strings) for a jinja chat template, or None if not recognised."""
    for marker, go, stops in _FAMILIES:
        if chat_template and marker in chat_template:
            return go, list(stops)
    return None


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML jinja template inserts when the chat has none (SmolLM2)."""
    m = re.search(r"'<\|im_start\|>system\n(.+?)<\|im_end\|>", chat_template or "", re.S)
    return m.group(1) if m and "{{" not in m.group(1) else None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def write_modelfile(gguf_path, chat_template: str | None, stop: list[str] | None = None, *,
                    eos: str | None = None, num_ctx: int | None = None) -> Path:
    """Write ``<gguf stem>.Modelfile`` next to ``gguf_path`` and return its path.

    ``stop`` defaults to the stop strings of the template family plus the EOS token text.
    """
    gguf_path = Path(gguf_path)
    lines = [f"# Ollama Modelfile written by distil: ollama create NAME -f {gguf_path.stem}.Modelfile",
             f"FROM ./{gguf_path.name}"]
    family = template_family(chat_template)
    if family is not None:
        template, stops = family
        lines.append(f"TEMPLATE {_quote(template)}")
        if (system := default_system_prompt(chat_template)) is not None:
            lines.append(f"SYSTEM {_quote(system)}")
    elif chat_template:
        lines.append("# chat template not recognised: Ollama derives one from the GGUF")
        stops = []
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')  # base model: plain completion
        stops = []
    if stop is None:
        stop = stops + ([eos] if eos and eos not in stops else [])
    for s in stop:
        plain = "\n" not in s and '"' not in s
        lines.append(f'PARAMETER stop "{s}"' if plain else f"PARAMETER stop {_quote(s)}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    out = gguf_path.with_suffix(".Modelfile")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out
