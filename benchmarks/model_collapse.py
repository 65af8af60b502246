"""Model collapse, simulated: generation after generation of a tiny model trained on its predecessor's samples.

    nice -n 10 python benchmarks/model_collapse.py                    # 3 seeds, generations 0..3, both settings
    python benchmarks/model_collapse.py --quick                       # a smoke run (2 generations, 2 steps)

Generation 0: `recipes/model_collapse.yaml` (a 2-layer, hidden-64 character Llama, trained from scratch on the real
whole texts of the sum3 task) through `distil.pipeline.run`. Generation g+1: the same recipe, a fresh random init
(seed changes with g), trained for the same steps on `--samples` texts sampled at temperature 1 from generation g
(from the BOS token alone: the model writes whole texts), either on the samples only ("no mitigation") or with a
fraction `--real-fraction` of those records replaced by real training texts ("keep 10% real"). Every generation is
measured on the same 200 held-out REAL texts (perplexity, tail mass p < 1e-4 and < 1e-2, KL(generation 0 ||
generation g)) and on its own samples (distinct-1/2/4, mean predictive entropy); distil/eval/collapse.py has the
formulas. Writes benchmarks/results/model_collapse.json and model_collapse.png (mean and min..max over seeds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "model_collapse.yaml"
SETTINGS = {"no mitigation": 0.0, "keep real": None}  # None: --real-fraction
MEASURES = [("ppl", "perplexity of held-out real text"), ("tail_mass", "tail mass: real tokens with p < 1e-4"),
            ("kl_to_gen0", "KL(gen 0 || gen g) on real text"), ("distinct_4", "distinct-4 of samples"),
            ("sample_entropy", "mean entropy of samples (nats)"), ("tail_mass_1e-2", "real tokens with p < 1e-2")]


def train_generation(seed: int, gen: int, setting: str, data_file: Path | None, args: argparse.Namespace) -> tuple:
    """One generation through distil's pipeline; returns the trained model and its tokenizer."""
    from distil.pipeline import run
    from distil.recipe import load_recipe

    name = f"s{seed}-gen0" if gen == 0 else f"s{seed}-{'real' if SETTINGS[setting] is None else 'none'}-gen{gen}"
    overrides = [f"seed={seed * 100 + gen}", f"name={name}", f"output.dir={args.out}", f"train.steps={args.steps}",
                 "output.save_student=true"]
    if data_file is not None:
        overrides += [f"data.source={data_file}", "data.max_records=null", "data.eval_size=0"]
    recipe = load_recipe(RECIPE, overrides)
    run(recipe, overwrite=True, echo=lambda s: None)
    from distil.models import load_model

    loaded = load_model(str(Path(args.out) / name / "student"))
    return loaded.model.eval(), loaded.tokenizer


def simulate(seed: int, args: argparse.Namespace) -> dict:
    """Both settings of one seed: generation 0 once, then `--generations` more per setting."""
    from distil import data as data_mod
    from distil.eval.collapse import measure, mix_real, sample_texts, write_text_records
    from distil.readers import read_records
    from distil.recipe import load_recipe

    base = load_recipe(RECIPE, [f"seed={seed * 100}"])
    model, tok = train_generation(seed, 0, "no mitigation", None, args)
    _, held_out = data_mod.load_examples(base.data, tok, base.seed)  # the real held-out texts (gen 0's split)
    real = read_records(base.data.source, base.data.max_records)
    held_texts = {tok.decode(e["input_ids"], skip_special_tokens=True) for e in held_out}
    real = [r for r in real if r["text"] not in held_texts]  # never train a later generation on held-out text
    pad, vocab = data_mod.pad_id(tok), len(tok)
    samples = sample_texts(model, tok, args.samples, args.max_new_tokens, seed=seed * 100)
    row0, ref = measure(model, tok, held_out, samples, pad, vocab)
    out = {}
    for setting, frac in SETTINGS.items():
        frac = args.real_fraction if frac is None else frac
        rows, cur = [row0], samples
        for g in range(1, args.generations + 1):
            records = mix_real([{"text": s} for s in cur if s], real, frac, seed=seed * 100 + g)
            tag = "real" if SETTINGS[setting] is None else "none"
            data_file = write_text_records(records, Path(args.out) / "data" / f"s{seed}-{tag}-gen{g}.jsonl")
            model, tok = train_generation(seed, g, setting, data_file, args)
            cur = sample_texts(model, tok, args.samples, args.max_new_tokens, seed=seed * 100 + g)
            row, _ = measure(model, tok, held_out, cur, pad, vocab, ref_logp=ref)
            rows.append(row)
            print(f"seed {seed} {setting:<14} gen {g}: " + "  ".join(f"{k} {row[k]:.4g}" for k, _ in MEASURES),
                  flush=True)
        out[setting] = rows
    print(f"seed {seed} gen 0: " + "  ".join(f"{k} {row0[k]:.4g}" for k, _ in MEASURES), flush=True)
    return out


def summarize(per_seed: list[dict]) -> dict:
    """mean, min, max over seeds of every measure, per setting and generation."""
    out: dict = {}
    for setting in per_seed[0]:
        gens = len(per_seed[0][setting])
        out[setting] = []
        for g in range(gens):
            row = {}
            for key in per_seed[0][setting][g]:
                vals = [s[setting][g][key] for s in per_seed]
                row[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
            out[setting].append(row)
    return out


def plot(summary: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, MEASURES):
        for setting, rows in summary.items():
            g = list(range(len(rows)))
            mean = [r[key]["mean"] for r in rows]
            ax.plot(g, mean, marker="o", label=setting)
            ax.fill_between(g, [r[key]["min"] for r in rows], [r[key]["max"] for r in rows], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generation")
        ax.set_xticks(g)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Model collapse, tiny char Llama on sum3 texts ({label}); mean and min..max over seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(summary: dict) -> str:
    head = f"{'setting':<16} {'gen':>3} " + " ".join(f"{k:>14}" for k, _ in MEASURES)
    lines = [head, "-" * len(head)]
    for setting, rows in summary.items():
        for g, r in enumerate(rows):
            lines.append(f"{setting:<16} {g:>3} " + " ".join(f"{r[k]['mean']:>14.4g}" for k, _ in MEASURES))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--generations", type=int, default=3, help="generations after generation 0")
    p.add_argument("--steps", type=int, default=120, help="training steps of every generation")
    p.add_argument("--samples", type=int, default=600, help="texts sampled per generation (= its training set)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--real-fraction", type=float, default=0.1)
    p.add_argument("--out", default=str(ROOT / "runs" / "model_collapse"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 generations of 2 steps, 20 samples")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.generations, args.steps, args.samples = 1, 2, 2, 20
    import torch

    torch.set_num_threads(1)
    start = time.time()
    per_seed = [simulate(s, args) for s in range(args.seeds)]
    wall = time.time() - start
    summary = summarize(per_seed)
    label = f"{args.seeds} seeds, {args.steps} steps x batch 32 per generation, {args.samples} samples"
    print(table(summary))
    print(f"wall {wall:.0f}s")
    if args.quick:
        return 0
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    plot(summary, res / "model_collapse.png", label)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or platform.platform()})",
        "load_average_at_end": os.getloadavg(),
        "command": "python benchmarks/model_collapse.py " + " ".join(sys.argv[1:]),
        "wall_seconds": round(wall),
        "recipe": "recipes/model_collapse.yaml",
        "settings": {"no mitigation": 0.0, "keep real": args.real_fraction},
        "sizes": {"seeds": args.seeds, "generations_after_0": args.generations, "steps": args.steps,
                  "batch_size": 32, "samples_per_generation": args.samples, "max_new_tokens": args.max_new_tokens,
                  "held_out_real_texts": 200},
        "summary": summary,
        "per_seed": per_seed,
        "table": table(summary),
    }
    (res / "model_collapse.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
