"""genai_config.json: lets onnxruntime-genai run the export folder's embedding + decoder graphs as they are.

    write_genai_config(folder, cfg)
    # then, with onnxruntime-genai installed:
    model = og.Model(folder); params = og.GeneratorParams(model); params.set_search_options(max_length=64)
    generator = og.Generator(model, params)
    generator.set_inputs(named)            # named["image_features"] = zeros [1, 1, D] for text, or vision.onnx's output
    generator.append_tokens(prompt_ids)

Why a pipeline: onnxruntime-genai's stock decoder types ("phi", ...) feed `input_ids` to one graph, but our decoder
takes `inputs_embeds` (that is how the image vectors get in), and its builder cannot make TinyGPT-V's decoder (it drops
the q/k LayerNorm). Its "decoder-pipeline" type chains graphs by tensor name, so the config runs embedding.onnx
(input_ids -> inputs_embeds) then decoder.onnx (inputs_embeds + mask + positions + KV -> logits + KV), unchanged.
The embedding graph's second input, `image_features`, is not a tensor genai manages: callers pass it as an extra
input with `generator.set_inputs` — a [B, 1, D] row of zeros for text prompts, or vision.onnx's [B, N, D] output with a
prompt holding N image ids, which makes genai answer about the image too. Greedy search; `past_present_share_buffer` is
false for the plain decoder, which concatenates the cache itself, and true for the GQA decoder (export.gqa).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import ModelConfig
from export.graphs import GRAPH_FILES, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, kv_names

GENAI_CONFIG_FILE = "genai_config.json"


def genai_config(cfg: ModelConfig, attention: str = "plain") -> dict[str, Any]:
    """The config for a folder whose decoder has `attention` "plain" or "gqa" (export.gqa: past and present share one
    buffer, which genai allocates at max_length and binds to both)."""
    lm = cfg.language_model
    decoder_inputs = ["inputs_embeds", "attention_mask", "position_ids", *kv_names(lm.num_layers, past=True)]
    decoder_outputs = ["logits", *kv_names(lm.num_layers, past=False)]
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": lm.bos_token_id,
            "eos_token_id": lm.eos_token_id,
            "pad_token_id": lm.eos_token_id,
            "context_length": lm.max_position_embeddings,
            "vocab_size": lm.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": lm.head_size,
                "hidden_size": lm.hidden_size,
                "num_attention_heads": lm.num_heads,
                "num_key_value_heads": lm.num_heads,
                "num_hidden_layers": lm.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "pipeline": [
                    {
                        "embedding": {
                            "filename": GRAPH_FILES["embedding"],
                            "inputs": ["input_ids", "image_features"],
                            "outputs": ["inputs_embeds"],
                            "run_on_prompt": True,
                            "run_on_token_gen": True,
                        }
                    },
                    {
                        "decoder": {
                            "filename": GRAPH_FILES["decoder"],
                            "inputs": decoder_inputs,
                            "outputs": decoder_outputs,
                            "run_on_prompt": True,
                            "run_on_token_gen": True,
                        }
                    },
                ],
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": lm.max_position_embeddings,
            "min_length": 0,
            "past_present_share_buffer": attention == "gqa",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: str | Path, cfg: ModelConfig, attention: str = "plain") -> Path:
    path = Path(folder) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(cfg, attention), indent=2) + "\n")
    return path
