"""The torch-free runtime: an export folder in, answers out (onnxruntime, numpy, tokenizers, Pillow only).

    from runtime import Pipeline
    pipe = Pipeline.load("exports/demo-int4", threads=2)
    print(pipe.generate("photo.jpg", "[vqa] What colour is the circle?").text)

The command line is `python -m runtime --help`. Nothing here imports torch, transformers, training/ or export/.
"""

from runtime.pipeline import Pipeline, Stream

__all__ = ["Pipeline", "Stream"]
