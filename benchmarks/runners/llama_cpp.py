"""llama.cpp as a peer: build llama-bench from llama-cpp-python's source distribution, convert to GGUF, run llama-bench.

    python -m benchmarks.runners.llama_cpp --build          # pip download + cmake (10-30 min on 2 busy cores)

llama-cpp-python's sdist carries llama.cpp's sources (vendor/llama.cpp) with llama-bench, llama-quantize and
convert_hf_to_gguf.py, so one `pip download` gets everything and no other host is needed. The build goes to
$TINYGPTV_LLAMA_CPP (default ~/.cache/tinygptv-edge/llama.cpp): `src/` (the sources) and `build/bin/`.

llama-bench repeats by itself, so this runner implements `run_all`: prompt processing `-p N -n 0` and generation at
that depth `-p 0 -n NEW -d N`, each `-r reps` after its own warm-up run. Its per-repetition totals become Samples:
TTFT = the prompt's processing time (llama-bench excludes tokenization and sampling), decode = NEW / generation time.
It reports no per-token times, so inter-token p50/p90 are that average. Peak RSS: the child's VmHWM, polled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bandwidth import gguf_decode_bytes, kv_bytes
from benchmarks.harness import Sample, peak_rss_bytes
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)

SDIST = "llama-cpp-python==0.3.36"
HOME = Path(os.environ.get("TINYGPTV_LLAMA_CPP", Path.home() / ".cache" / "tinygptv-edge" / "llama.cpp"))
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
               "-DBUILD_SHARED_LIBS=OFF"]  # fmt: skip


class LlamaCppMissing(RuntimeError):
    pass


def tool(name: str, explicit: str | None = None) -> Path:
    """Path of a llama.cpp tool: the explicit path, $LLAMA_BENCH-style env, the kit's build, or PATH."""
    env = os.environ.get(name.upper().replace("-", "_"))
    for candidate in (explicit, env, HOME / "build" / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise LlamaCppMissing(f"{name} not found; build it with: python -m benchmarks.runners.llama_cpp --build")


def source_dir() -> Path:
    src = HOME / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppMissing(f"{src}: no llama.cpp sources; run python -m benchmarks.runners.llama_cpp --build")
    return src


# llama.cpp's AMX backend (picked by GGML_NATIVE on CPUs with AMX-INT8) segfaults in its first Q4_0 matmul on the
# Xeon boxes of 2026-12-02 (llama-bench exit -11 right after "amx repack tensor ..."; upstream ggml-org/llama.cpp#20824,
# closed unfixed), while `--repack 0` runs. So on such CPUs the build keeps -march=native but drops the AMX ISA, which
# leaves llama.cpp its AVX-512 path with the Q4_0 interleaved repack (CPU_REPACK), its best kernel without AMX.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether /proc/cpuinfo (or the given text) lists the amx_int8 flag."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(line.startswith("flags") and " amx_int8" in line for line in cpuinfo.splitlines())


def cmake_flags(amx: bool) -> list[str]:
    return [*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"] if amx else list(CMAKE_FLAGS)


def build(jobs: int = 2) -> Path:
    """pip download the sdist, unpack vendor/llama.cpp to HOME/src, build llama-bench and llama-quantize."""
    HOME.mkdir(parents=True, exist_ok=True)
    if not (HOME / "src" / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                            SDIST], check=True)  # fmt: skip
            archive = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            vendor = next(Path(tmp).glob("*/vendor/llama.cpp"))
            shutil.copytree(vendor, HOME / "src", dirs_exist_ok=True)
    build_dir = HOME / "build"
    amx = cpu_has_amx()
    if amx:
        logger.warning("this CPU has AMX: building llama.cpp without its AMX backend (see NO_AMX)")
    subprocess.run(["cmake", "-S", str(HOME / "src"), "-B", str(build_dir), *cmake_flags(amx)], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama-bench", "llama-quantize"],
                   check=True)  # fmt: skip
    return build_dir / "bin"


def convert(hf_dir: Path, out: Path, quant: str = "Q4_0") -> Path:
    """A Hugging Face Phi-2 folder -> f32 GGUF (convert_hf_to_gguf.py) -> `quant` GGUF (llama-quantize)."""
    src = source_dir()
    f32 = out.with_suffix(".f32.gguf")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The convert script refuses tokenizers whose pre-tokenizer hash it does not know (ours is a stand-in byte-level
    # BPE for random weights): declare it Phi-2's.
    script = (
        "import sys; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]);"
        "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'phi-2';"
        "import convert_hf_to_gguf as c; c.main()"
    )
    subprocess.run([sys.executable, "-c", script, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile",
                    str(f32), "--outtype", "f32"], check=True, env=env)  # fmt: skip
    subprocess.run([str(tool("llama-quantize")), str(f32), str(out), quant], check=True, stdout=subprocess.DEVNULL)
    f32.unlink()
    return out


def samples_from_llama_bench(pp_ns: list[int], tg_ns: list[int], new_tokens: int) -> list[Sample]:
    """llama-bench's per-repetition totals (pp N tokens, tg NEW tokens at depth N) as Samples of NEW tokens.

    The first token comes at the end of prompt processing; the others `tg / NEW` apart, so decode tokens/s is
    NEW / tg, llama-bench's own t/s.
    """
    samples = []
    for prompt_ns, gen_ns in zip(pp_ns, tg_ns):
        step = gen_ns / new_tokens
        tokens = [int(prompt_ns + k * step) for k in range(new_tokens)]
        samples.append(Sample(0, int(prompt_ns + gen_ns), tokens, {"prefill": int(prompt_ns)}))
    return samples


def _run_json(cmd: list[str]) -> tuple[list[dict], int]:
    """Run llama-bench with -o json; (its records, the child's peak RSS polled from /proc)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_rss_bytes(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {err.strip().splitlines()[-1:] or ''}")
    return json.loads(out), peak[0]


class LlamaBenchRunner:
    load_is_measured = False  # llama-bench loads inside its own process; its load time is not reported

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.info: dict = {}
        self.child_peak_rss_bytes = 0

    def load(self) -> None:
        from gguf import GGUFReader

        c = self.config
        self.bench = tool("llama-bench", c.options.get("llama_bench"))
        if not Path(c.model).is_file():
            raise FileNotFoundError(f"{c.model}: no GGUF file")
        fields = GGUFReader(c.model).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()

        def value(key: str) -> int:
            return int(fields[f"{arch}.{key}"].parts[-1][0])

        layers, heads, width = value("block_count"), value("attention.head_count"), value("embedding_length")
        mean_context = c.prompt_tokens + c.new_tokens / 2
        self.info = {
            "precision": c.precision,
            "disk_bytes": Path(c.model).stat().st_size,
            "decode_weights_bytes": gguf_decode_bytes(c.model)["weights_bytes"],
            "kv_bytes_mid": kv_bytes(layers, heads, width // heads, mean_context, 2),  # f16 KV cache (default)
            "image_tokens": 0,
            "provider": "cpu",
            "note": "llama-bench: synthetic prompt tokens, no sampling; per-token times are the average",
        }

    def run_all(self) -> tuple[list[Sample], Sample | None]:
        c = self.config
        base = [str(self.bench), "-m", c.model, "-t", str(c.threads), "-r", str(c.reps), "-o", "json"]
        pp, peak_pp = _run_json(base + ["-p", str(c.prompt_tokens), "-n", "0"])
        tg, peak_tg = _run_json(base + ["-p", "0", "-n", str(c.new_tokens), "-d", str(c.prompt_tokens)])
        self.child_peak_rss_bytes = max(peak_pp, peak_tg)
        self.info["build_commit"] = pp[0].get("build_commit")
        self.info["cpu_info"] = pp[0].get("cpu_info")
        return samples_from_llama_bench(pp[0]["samples_ns"], tg[0]["samples_ns"], c.new_tokens), None

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runners.llama_cpp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--build", action="store_true", help=f"download {SDIST}'s sources and build the tools")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        print(f"built {build(args.jobs)}")
    else:
        print(f"llama-bench: {tool('llama-bench')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
