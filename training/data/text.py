"""The original's caption text processor and the instruction templates of every dataset it trains on.

`caption_text` is MiniGPT-4's `blip_caption` processor (`minigpt4/processors/blip_processors.py::pre_caption`), kept
character for character: lowercase; each of `. ! " ( ) * # : ; ~` becomes a space; every run of two or more whitespace
characters becomes one space (a lone newline or tab inside the text survives, as in the original); trailing newlines
and surrounding spaces are stripped; the result is cut to `max_words` space-separated words. The loaders apply it where
the original does (reference §1.9): LAION/CC/SBU captions, VQA questions and answers, RefCOCO and Visual Genome phrases,
TextCaps captions, LLaVA detail/reason questions, unnatural-instruction input and output. Never to cc_sbu_align captions,
LLaVA answers, conversations, Flickr fields or box strings.

The template pools below are copied from MiniGPT-v2's dataset classes (`minigpt4/datasets/datasets/*.py`) and
MiniGPT-4's `prompts/alignment.txt` (absent from the TinyGPT-V repository, reference §2). Loaders pick one with the
`random.Random` they are given; the image text `<Img><ImageHere></Img>` is put in front by `core.prompts.with_image`.
The original also leaves a trailing space after each instruction (`"<Img><ImageHere></Img> {} "`); ours is stripped,
because the stage template (`[INST] {} [/INST]`) supplies the separator.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def caption_text(text: str, max_words: int = 50) -> str:
    """`blip_caption`: 'A Dog (brown)!  Runs.' -> 'a dog brown runs'."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


# Stage 3 (`prompts/alignment.txt` of MiniGPT-4): the image text is already part of each line.
ALIGNMENT_PROMPTS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)

# COCO-VQA, OK-VQA, A-OKVQA, GQA (`coco_vqa_datasets.py`, `aok_vqa_datasets.py`, `gqa_datasets.py`).
VQA_TEMPLATES = (
    "[vqa] {}",
    "[vqa] Based on the image, respond to this question with a short answer: {}",
)

# RefCOCO/+/g and Visual Genome regions (`coco_dataset.py::ReferCOCODataset`, `vg_dataset.py`): {} = the phrase.
REFER_TEMPLATES = (
    "[refer] {}",
    "[refer] give me the location of {}",
    "[refer] where is {} ?",
    "[refer] from this image, tell me the location of {}",
    "[refer] the location of {} is",
    "[refer] could you tell me the location for {} ?",
    "[refer] where can I locate the {} ?",
)

# Inverse RefCOCO/+/g (`coco_dataset.py::InvReferCOCODataset`): {} = the box string.
IDENTIFY_TEMPLATES = (
    "[identify] {}",
    "[identify] what object is in this location {}",
    "[identify] identify the object present at this location {}",
    "[identify] what is it in {}",
    "[identify] describe this object in {}",
    "[identify] this {} is",
    "[identify] the object in {} is",
)

# Flickr30k grounded caption (`flickr.py::GroundedDetailDataset`).
GROUNDING_TEMPLATES = (
    "[grounding] please describe this image in details",
    "[grounding] describe this image as detailed as possible",
    "[grounding] summarize this image in details",
    "[grounding] give a thorough description of what you see in this image",
)

# Flickr30k caption->boxes and phrase->box (`flickr.py::CaptionToObjectDataset`, `PhraseToObjectDataset`).
DETECTION_TEMPLATE = "[detection] {}"

# TextCaps (`text_caps.py`): written as `[caption] {prompt}`. Some prompts end in a space in the original; kept.
CAPTION_PROMPTS = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
    "A short image caption:",
    "A short image description:",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
