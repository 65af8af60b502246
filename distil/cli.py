"""The `distil` command: one function per verb, chosen through a plain dict.

  distil run RECIPE [key=value ...] [--resume [CKPT]] [--overwrite]
  distil validate RECIPE [key=value ...] [--explain]
  distil cache RECIPE [key=value ...]
  distil eval RUN_DIR_OR_RECIPE [key=value ...]
  distil export MODEL_DIR_OR_RUN --gguf OUT.gguf --quant Q4_K_M
  distil generate MODEL_OR_RECIPE [key=value ...] --prompts FILE --out FILE.jsonl [--backend hf|llamacpp]
  distil prune RECIPE [key=value ...] --out DIR [--overwrite]
  distil inspect MODEL_OR_RUN --text TEXT [--positions 3,7] [--temperatures 1,2,4] [--top-k 5] [--png FILE]
  distil advise RECIPE [key=value ...] [--teachers A,B] [--teacher-recipe R --teacher-steps 150,600] [--png FILE]
  distil ls
  distil demo [key=value ...]

Bad input of any kind prints one line and exits with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distil.errors import DistilError

RECIPES_DIR = Path(os.environ.get("DISTIL_RECIPES") or Path(__file__).resolve().parent.parent / "recipes")


def bundled_recipes() -> dict[str, Path]:
    if not RECIPES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    """A path, or the name of a bundled recipe (`distil run demo`)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = bundled_recipes()
    if name in bundled:
        return bundled[name]
    if path.suffix in (".yaml", ".yml"):
        raise DistilError(f"{path}: recipe file not found")
    raise DistilError(f"{name}: not a recipe file or a bundled recipe (see `distil ls`)")


def _setup_quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_run(args: argparse.Namespace) -> int:
    from distil.pipeline import run
    from distil.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    _setup_quiet()
    result = run(recipe, resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from distil.recipe import explain, load_recipe

    if args.explain:
        print("\n".join(explain()))
        return 0
    if not args.recipe:
        raise DistilError("validate: expected a recipe path (or --explain)")
    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    from distil.methods import METHODS

    loss = METHODS[recipe.distill.method].loss_name(recipe)
    print(f"{args.recipe}: ok (name={recipe.name}, method={recipe.distill.method}, loss={loss}, "
          f"steps={recipe.train.steps})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distil.evaluate import evaluate_target

    _setup_quiet()
    table = evaluate_target(args.target, args.overrides, student_dir=args.student)
    print(table)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    bundled = bundled_recipes()
    if not bundled:
        print(f"no bundled recipes found in {RECIPES_DIR}")
        return 0
    width = max(len(n) for n in bundled)
    for name, path in bundled.items():
        lines = [ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        summary = next((ln for ln in lines if ln and not ln.startswith("distil ")), "")
        print(f"{name:<{width}}  {summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distil.pipeline import run
    from distil.recipe import load_recipe

    recipe = load_recipe(find_recipe("demo"), args.overrides)
    _setup_quiet()
    result = run(recipe, overwrite=True)
    print(f"run directory: {result.run_dir}")
    if result.student_dir is not None:
        print(f"distilled student (Hugging Face directory): {result.student_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distil.export import export_gguf

    src = Path(args.model)
    if (src / "student" / "config.json").is_file():
        src = src / "student"  # a run directory: export its student
    result = export_gguf(src, args.gguf, args.quant, modelfile=not args.no_modelfile)
    print(f"wrote {result.path} ({result.quant}, {result.size_bytes / 1e6:.1f} MB)")
    if result.modelfile:
        print(f"wrote {result.modelfile} (ollama create NAME -f {result.modelfile})")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from distil.methods.cache import cache_for_recipe, info
    from distil.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    _setup_quiet()
    if recipe.train.threads:
        import torch

        torch.set_num_threads(recipe.train.threads)
    found = info(cache_for_recipe(recipe))
    print(f"cache: {found.dir} ({found.rows} target tokens, {found.shards} shards, k={recipe.cache.k}, "
          f"{found.bytes / 1e6:.1f} MB, {found.bytes_per_token:.0f} bytes/token)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from distil.generation import GenParams
    from distil.generation.sources import generate_file

    _setup_quiet()
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, min_p=args.min_p, n=args.n, seed=args.seed, stop=tuple(args.stop),
                       num_beams=args.num_beams, chat=False if args.no_chat else None)
    result, skipped = generate_file(args.model, args.prompts, args.out, params, backend=args.backend,
                                    overrides=args.overrides, batch_size=args.batch_size, gguf_quant=args.gguf_quant,
                                    threads=args.threads, overwrite=args.overwrite, progress=not args.no_progress)
    if skipped:
        print(skipped, file=sys.stderr)
    truncated = sum(r["finish_reason"] == "length" for r in result.records)
    print(f"wrote {args.out}: {len(result.records)} samples ({result.generated} generated now, {result.kept} kept "
          f"from an earlier run; {truncated} cut at max_new_tokens), {result.new_tokens} new tokens in "
          f"{result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from distil.methods.prune import prune_to_dir
    from distil.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    _setup_quiet()
    prune_to_dir(recipe, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (Hugging Face directory; what was removed: {args.out}/prune.json)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from distil.eval.inspect import inspect_target

    _setup_quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(inspect_target(args.model, args.text, positions=args.positions, temperatures=args.temperatures,
                         k=args.top_k, png=args.png, warn=lambda line: print(line, file=sys.stderr)))
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    """The capacity-gap sweep (distil/eval/capacity.py): the recipe's student from each teacher, direct and through
    the TAKD chain; a table (and a PNG / JSON)."""
    import json as json_mod

    import yaml

    from distil.eval.capacity import format_table, plot, sweep, train_teachers
    from distil.recipe import load_recipe

    import time

    start = time.time()
    path = find_recipe(args.recipe)
    recipe = load_recipe(path, args.overrides)
    _setup_quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    assistant = recipe.takd.assistant or None
    if args.assistant is not None:
        try:
            assistant = yaml.safe_load(args.assistant)
        except yaml.YAMLError:
            assistant = None
        if not isinstance(assistant, dict):
            raise DistilError(f"advise: --assistant: expected a YAML mapping of config overrides such as "
                              f"'{{num_hidden_layers: 1}}', found {args.assistant!r}")
    teachers = [t for t in (args.teachers or "").split(",") if t]
    if args.teacher_steps:
        if not args.teacher_recipe:
            raise DistilError("advise: --teacher-steps: expected --teacher-recipe (the recipe that trains them), "
                              "found none")
        try:
            steps = [int(x) for x in args.teacher_steps.split(",") if x]
        except ValueError:
            raise DistilError(f"advise: --teacher-steps: expected comma-separated integers, found "
                              f"{args.teacher_steps!r}") from None
        teachers = train_teachers(find_recipe(args.teacher_recipe), steps, args.out) + teachers
    if not teachers:
        if not recipe.teacher.source:
            raise DistilError("advise: expected --teachers or --teacher-steps (or a recipe teacher), found none")
        teachers = [recipe.teacher.source]
    rows = sweep(path, teachers, args.overrides, assistant=assistant, out=args.out)
    print(format_table(rows))
    if args.png:
        print(f"wrote {plot(rows, args.png)}")
    if args.json:
        import datetime as dt
        import platform

        record = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_at_end": os.getloadavg(),
                  "command": "distil " + " ".join(sys.argv[1:]), "wall_seconds": round(time.time() - start),
                  "assistant": assistant, "rows": rows, "table": format_table(rows)}
        Path(args.json).write_text(json_mod.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


VERBS = {"run": cmd_run, "validate": cmd_validate, "eval": cmd_eval, "ls": cmd_ls, "demo": cmd_demo,
         "export": cmd_export, "cache": cmd_cache, "generate": cmd_generate,
         "prune": cmd_prune, "inspect": cmd_inspect, "advise": cmd_advise}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distil", description="Knowledge distillation of language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="verb", required=True)

    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe", help="recipe YAML (or the name of a bundled recipe)")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides")
    r.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of the run, or from CKPT")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe", nargs="?")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--explain", action="store_true", help="print every recipe key with its documentation")

    e = sub.add_parser("eval", help="evaluate a run directory (or a recipe's initial student) against the teacher")
    e.add_argument("target", help="run directory or recipe")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--student", default=None, help="evaluate this student directory instead")

    c = sub.add_parser("cache", help="build (or finish, or check) a recipe's teacher-logit cache (top-k on disk)")
    c.add_argument("recipe", help="recipe YAML (or the name of a bundled recipe)")
    c.add_argument("overrides", nargs="*", help="key.path=value overrides")

    sub.add_parser("ls", help="list bundled recipes")

    d = sub.add_parser("demo", help="distil the embedded SmolLM2-135M-Instruct into a smaller student")
    d.add_argument("overrides", nargs="*")

    x = sub.add_parser("export", help="write a GGUF file (and an Ollama Modelfile)")
    x.add_argument("model", help="Hugging Face model directory or run directory")
    x.add_argument("--gguf", required=True, help="output .gguf path")
    x.add_argument("--quant", default="Q4_K_M", help="F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K_M, Q5_K_M, Q6_K")
    x.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")

    g = sub.add_parser("generate", help="generate completions of prompts into a resumable JSONL file")
    g.add_argument("model", help="HF model directory, .gguf file, embedded:NAME, or a recipe (its teacher)")
    g.add_argument("overrides", nargs="*", help="key.path=value overrides of the recipe")
    g.add_argument("--prompts", required=True, help=".jsonl ({\"prompt\": ...} or {\"messages\": [...]}) or .txt")
    g.add_argument("--out", required=True, help="output .jsonl (resumed when it exists; identity in OUT.meta.json)")
    g.add_argument("--backend", choices=["hf", "llamacpp"], default="hf",
                   help="hf: transformers, batched (default); llamacpp: llama-cpp-python on a GGUF")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("-n", "--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0, help="sample (p, s) uses seed sample_seed(seed, p, s)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search (hf backend, greedy only); 1 = off")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="feed the raw prompt text, not the chat template")
    g.add_argument("--batch-size", type=int, default=8, help="hf backend: prompts per batch")
    g.add_argument("--gguf-quant", choices=["F16", "Q8_0"], default="F16",
                   help="llamacpp backend, HF model: type of the one-off cached GGUF export")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (torch and llama.cpp)")
    g.add_argument("--overwrite", action="store_true", help="start again instead of resuming OUT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr = sub.add_parser("prune", help="structured pruning of a recipe's student by its prune: section (no training)")
    pr.add_argument("recipe", help="recipe YAML (or the name of a bundled recipe)")
    pr.add_argument("overrides", nargs="*", help="key.path=value overrides (e.g. prune.depth=20 prune.mlp=0.5)")
    pr.add_argument("--out", required=True, help="output Hugging Face model directory")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ins = sub.add_parser("inspect", help="dark knowledge: the soft targets behind each next token (teacher and "
                         "student of a run side by side)")
    ins.add_argument("model", help="run directory (its teacher and student), HF model directory, .gguf or "
                     "embedded:NAME")
    ins.add_argument("--text", required=True, help="the text to read")
    ins.add_argument("--positions", default=None, help="comma-separated token positions (negative: from the end); "
                     "default: all (the first 32)")
    ins.add_argument("--temperatures", default="1,2,4", help="comma-separated softmax temperatures")
    ins.add_argument("--top-k", type=int, default=5, help="soft targets shown per position")
    ins.add_argument("--png", default=None, help="also draw the table as a PNG")
    ins.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    adv = sub.add_parser("advise", help="capacity gap: the recipe's student distilled from several teachers, direct "
                         "and through a teacher assistant (TAKD); table + PNG")
    adv.add_argument("recipe", help="recipe YAML (or the name of a bundled recipe): the student, data and budget")
    adv.add_argument("overrides", nargs="*", help="key.path=value overrides")
    adv.add_argument("--teachers", default=None, help="comma-separated teacher sources (one vocabulary)")
    adv.add_argument("--teacher-recipe", default=None, help="recipe that trains teachers of --teacher-steps")
    adv.add_argument("--teacher-steps", default=None, help="comma-separated train.steps of teachers trained once from "
                     "--teacher-recipe (cached in OUT/capacity-teacher-N)")
    adv.add_argument("--assistant", default=None, help="TAKD assistant as config overrides of the student, a YAML "
                     "mapping (default: the recipe's takd.assistant; none: direct only)")
    adv.add_argument("--out", default="runs", help="where the sweep's runs go")
    adv.add_argument("--png", default=None, help="plot student quality vs teacher strength")
    adv.add_argument("--json", default=None, help="write the rows as JSON")
    adv.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    import contextlib
    import io

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args, extra = parser.parse_known_args(argv)
            # key.path=value overrides may come after flags too (`distil run R --overwrite train.steps=5`)
            if extra and isinstance(getattr(args, "overrides", None), list) and \
                    all("=" in x and not x.startswith("-") for x in extra):
                args.overrides += extra
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        if exc.code in (0, None):  # --help (on stdout)
            sys.stderr.write(said.getvalue())
            return 0
        # argparse prints its usage, then "distil VERB: error: MESSAGE": keep the one line that says what is wrong
        last = next((ln for ln in reversed(said.getvalue().splitlines()) if ln.strip()), "")
        where, _, message = last.partition(": error: ")
        verb = where.split(" ", 1)[1] if " " in where else ""
        print(f"distil: error: {verb + ': ' if verb else ''}{message or last or 'invalid arguments'} "
              f"(see distil {verb + ' ' if verb else ''}--help)", file=sys.stderr)
        return 2
    sys.stderr.write(said.getvalue())
    try:
        return VERBS[args.verb](args)
    except DistilError as exc:
        if args.debug:
            raise
        print(f"distil: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("distil: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from distil.trainer import TrainingDiverged

        if isinstance(exc, TrainingDiverged) and not args.debug:
            print(f"distil: error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
