"""The fixed image and prompt set every benchmark run uses (images drawn by draw.py, prompts in prompts.json)."""
