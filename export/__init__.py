"""PyTorch checkpoint -> export folder (the contract with runtime/, DESIGN.md "export folder").

    python -m export.onnx     --model DIR --out DIR [--precision fp32|fp16|int8|int4] [--quant gptq|rtn|hqq|gptq-ort]
    python -m export.gptq     --model DIR --out DIR          # the decoder as a standard GPTQ checkpoint
    python -m export.quality  --model DIR --out DIR --eval-data FILE [--calib-data FILE]   # every precision, quality.md
GPTQ and the quality table read image + prompt + answer examples from JSON-lines files (export/calibration.py), so
export/ imports core/ only (and runtime/ nowhere): no training data code at export time.

graphs       the three traced graphs (vision, embedding, decoder) and their I/O contract
validate     signatures and PyTorch parity after every export (fp32 fails outside its tolerance)
manifest     manifest.json: graph signatures read from the files, sha256 of every file, model constants
quantize     fp16 / int8 graphs, int4 MatMulNBits decoder (RTN streaming, HQQ, GPTQ)
gptq_solver  GPTQ on the PyTorch decoder and the standard packed format; gptq: checkpoint folder, loading, ONNX packing
calibration  multimodal calibration / evaluation sequences (image vectors in inputs_embeds) from a data file
genai        genai_config.json for onnxruntime-genai; quality: the quality table; folder: atomic output folders
random_init  real-shape random weights, one graph's part at a time
"""
