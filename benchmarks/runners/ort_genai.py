"""onnxruntime-genai on a folder with genai_config.json: our export's graphs through another runtime, or its builder's.

Our export writes a "decoder-pipeline" genai_config.json (export/genai.py): onnxruntime-genai runs embedding.onnx then
decoder.onnx, unchanged, and takes `image_features` as an extra model input: a [1, 1, D] row of zeros for text, or
vision.onnx's output for a request with an image. For image requests this runner preprocesses the image and runs
vision.onnx with plain onnxruntime (genai's own image processors are not TinyGPT-V's), then hands the features to genai;
so the two runtimes get identical inputs. A builder's folder (type "phi", input_ids in, one graph) is fed token ids.

An export folder from before genai_config.json existed gets one in a temporary folder of links (`shadow_folder`).
Threads: the overlay sets genai's intra-op threads; its pools spin between ops, as our runtime's do by default
(`--no-spin` turns ours off; genai_config has no such setting), so on a busy machine compare at 1 thread, where no pool
exists.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from benchmarks.bandwidth import kv_bytes, onnx_decode_bytes
from benchmarks.harness import Clock, Sample
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


def shadow_folder(export_dir: Path, where: Path) -> Path:
    """Links to an export's files plus the genai_config.json export/genai.py would have written."""
    from core.config import ModelConfig
    from export.genai import genai_config

    manifest = json.loads((export_dir / "manifest.json").read_text())
    where.mkdir(parents=True, exist_ok=True)
    for item in export_dir.iterdir():
        if item.name != GENAI_CONFIG and not (where / item.name).exists():
            os.symlink(item.resolve(), where / item.name)
    cfg = ModelConfig.from_dict(manifest["source"]["config"])
    (where / GENAI_CONFIG).write_text(json.dumps(genai_config(cfg), indent=1))
    return where


def pipeline_inputs(cfg_json: dict) -> set[str]:
    """The inputs of a decoder-pipeline's graphs that genai does not manage itself (e.g. image_features)."""
    managed = {"input_ids", "inputs_embeds", "attention_mask", "position_ids"}
    names = set()
    for stage in cfg_json["model"]["decoder"].get("pipeline", []):
        for spec in stage.values():
            names |= {n for n in spec.get("inputs", []) if n not in managed and not n.startswith("past_")}
    return names


class GenaiRunner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.info: dict = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.vision = None

    def load(self) -> None:
        import onnxruntime_genai as og

        c = self.config
        folder = Path(c.model)
        note = None
        if not (folder / GENAI_CONFIG).is_file():
            if not (folder / "manifest.json").is_file():
                raise FileNotFoundError(f"{folder}: neither {GENAI_CONFIG} nor an export manifest.json")
            self._tmp = tempfile.TemporaryDirectory(prefix="genai_")
            folder = shadow_folder(folder, Path(self._tmp.name))
            note = "genai_config.json written by the benchmark (the export folder has none)"
        cfg_json = json.loads((folder / GENAI_CONFIG).read_text())
        d = cfg_json["model"]["decoder"]
        threads = {"intra_op_num_threads": c.threads, "inter_op_num_threads": 1}
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.extra = pipeline_inputs(cfg_json)
        self.hidden = d["hidden_size"]
        if c.image:
            self._load_vision(folder)
        stages = [spec for stage in d.get("pipeline", []) for name, spec in stage.items() if name == "decoder"]
        decoder_file = folder / (stages[0]["filename"] if stages else d["filename"])
        mean_context = c.prompt_tokens + c.new_tokens / 2
        kv_heads = d.get("num_key_value_heads", d["num_attention_heads"])
        self.info = {
            "precision": c.precision,
            "disk_bytes": sum(p.stat().st_size for p in folder.iterdir() if ".onnx" in p.name or p.suffix == ".data"),
            "decode_weights_bytes": onnx_decode_bytes(decoder_file)["weights_bytes"],
            "kv_bytes_mid": kv_bytes(d["num_hidden_layers"], kv_heads, d["head_size"], mean_context, 4),
            "image_tokens": self.manifest["num_image_tokens"] if c.image else 0,
            "provider": "cpu",
            "model_type": cfg_json["model"]["type"],
        }
        if note:
            self.info["note"] = note

    def _load_vision(self, folder: Path) -> None:
        """vision.onnx in plain onnxruntime with the same thread count; the manifest's preprocessing."""
        import onnxruntime as ort

        from core.config import ImageConfig

        self.manifest = json.loads((folder / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        vision_file = folder / self.manifest["graphs"]["vision"]["file"]
        self.vision = ort.InferenceSession(str(vision_file), options, providers=["CPUExecutionProvider"])
        self.image_cfg = ImageConfig.from_dict(self.manifest["image"])

    def run_once(self, clock: Clock) -> Sample:
        import numpy as np
        import onnxruntime_genai as og

        from core.image import preprocess_for

        c = self.config
        start = clock()
        phases: dict[str, int] = {}
        features = np.zeros((1, 1, self.hidden), dtype=np.float32)  # [1, 1, D]: text only, never read
        ids = c.text_ids
        if c.image:
            pixels = preprocess_for(c.image, self.image_cfg)[None]  # [1, 3, S, S]
            t1 = clock()
            (features,) = self.vision.run(None, {"pixel_values": pixels})  # [1, N, D]
            phases["preprocess"], phases["vision"] = t1 - start, clock() - t1
            ids = c.prompt_ids
        total = len(ids) + c.new_tokens
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        if "image_features" in self.extra:
            generator.set_model_input("image_features", features)
        before = clock()
        generator.append_tokens(np.asarray([ids], dtype=np.int32))  # prefill: the prompt's logits
        phases["prefill"] = clock() - before
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()  # picks from the current logits; runs the decoder for the previous token
            tokens.append(clock())
        end = clock()
        if len(tokens) != c.new_tokens:
            raise RuntimeError(f"ort-genai: {len(tokens)} tokens instead of exactly {c.new_tokens}")
        self.last_tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        return Sample(start, end, tokens, phases)

    def close(self) -> None:
        self.model = None
        self.vision = None
        if self._tmp is not None:
            self._tmp.cleanup()
