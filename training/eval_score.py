"""Score evaluation records (training/eval.py) into one summary section per benchmark, with the synthetic type table.

A record is a dict with the item's ground truth (`answers`, `gt_xyxy`, `width`, `height`, `label`, `qtype`, ...)
and the model's `prediction` (plus `choice` when the answer was also ranked by likelihood). Torch-free.

    summary = summarize(records)
    summary["headline"]   # {"vqa_accuracy": ..., "refer_acc_iou50": ...} on the synthetic split
"""

from __future__ import annotations

from collections import defaultdict

from core.metrics import (
    hateful_label,
    mean,
    normalize_answer,
    refer_hit,
    refer_hit_original,
    refer_iou,
    true_false,
    vizwiz_score,
    vqa_accuracy,
    vqa_exact,
    vqa_substring,
)

QUESTION_TYPES = ("colour", "shape", "count", "position", "exists")


def _vqa_section(records: list[dict], with_types: bool) -> dict:
    exact = [vqa_exact(r["prediction"], r["answers"]) for r in records]
    section = {
        "n": len(records),
        "accuracy": mean(exact),
        "accuracy_lenient": mean([max(vqa_substring(r["prediction"], a) for a in r["answers"]) for r in records]),
        "vqa_score": mean(
            [vqa_accuracy(r["prediction"], r["answers"] * (10 if len(r["answers"]) == 1 else 1)) for r in records]
        ),  # fmt: skip
        "vizwiz_score": mean(
            [vizwiz_score(r["prediction"], r["answers"] * (10 if len(r["answers"]) == 1 else 1)) for r in records]
        ),  # fmt: skip
    }
    yes_no = [e for e, r in zip(exact, records) if normalize_answer(r["answers"][0]) in ("yes", "no")]
    section["yes_no_accuracy"] = mean(yes_no)
    ranked = [r for r in records if "choice" in r]
    if ranked:
        section["likelihood_accuracy"] = mean([vqa_exact(r["choice"], r["answers"]) for r in ranked])
    if with_types:
        table = {}
        for qtype in QUESTION_TYPES:
            rows = [(e, r) for e, r in zip(exact, records) if r["qtype"] == qtype]
            if rows:
                table[qtype] = {
                    "n": len(rows),
                    "accuracy": mean([e for e, _ in rows]),
                    "accuracy_lenient": mean([vqa_substring(r["prediction"], r["answers"][0]) for _, r in rows]),
                }
                if ranked:
                    table[qtype]["likelihood_accuracy"] = mean(
                        [vqa_exact(r["choice"], r["answers"]) for _, r in rows if "choice" in r]
                    )
        section["by_type"] = table
    return section


def _refer_section(records: list[dict]) -> dict:
    hits, original, ious, parsed = [], [], [], []
    for r in records:
        w, h, gt = r["width"], r["height"], r["gt_xyxy"]
        value = refer_iou(r["prediction"], gt, w, h)
        ious.append(value)
        hits.append(float(refer_hit(r["prediction"], gt, w, h)))
        original.append(float(refer_hit_original(r["prediction"], gt, w, h)))
        parsed.append(float("{<" in r["prediction"].replace(" ", "")))
    return {
        "n": len(records),
        "acc_iou50": mean(hits),
        "acc_iou50_original_rule": mean(original),
        "mean_iou": mean(ious),
        "parsed": mean(parsed),
    }


def _identify_section(records: list[dict]) -> dict:
    """Exact name match, and `consistent`: every word of the answer is a word of the object's full name."""
    exact = [vqa_exact(r["prediction"], r["answers"]) for r in records]
    consistent = []
    for r in records:
        words, name = normalize_answer(r["prediction"]).split(), normalize_answer(r["answers"][0]).split()
        consistent.append(float(bool(words) and set(words) <= set(name) and words[-1] == name[-1]))
    return {"n": len(records), "accuracy": mean(exact), "consistent": mean(consistent)}


def summarize(records: list[dict]) -> dict:
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_bench[r["benchmark"]].append(r)
    out: dict = {}
    for bench, rows in sorted(by_bench.items()):
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_task[r["task"]].append(r)
        section: dict = {}
        if by_task.get("vqa"):
            section["vqa"] = _vqa_section(by_task["vqa"], with_types=bench == "synthetic")
        if by_task.get("refer"):
            section["refer"] = _refer_section(by_task["refer"])
        if by_task.get("identify"):
            section["identify"] = _identify_section(by_task["identify"])
        if by_task.get("choose"):
            section["likelihood"] = {
                "n": len(by_task["choose"]),
                "accuracy": mean([float(r["prediction"] == r["answers"][0]) for r in by_task["choose"]]),
            }
        if by_task.get("truefalse"):
            tf = by_task["truefalse"]
            section["truefalse"] = {"n": len(tf), "accuracy": mean([float(true_false(r["prediction"]) == r["answers"][0])
                                                                    for r in tf])}  # fmt: skip
        if by_task.get("hateful"):
            hm = by_task["hateful"]
            section["hateful"] = {"n": len(hm), "accuracy": mean([float(hateful_label(r["prediction"]) == r["label"])
                                                                  for r in hm])}  # fmt: skip
        out[bench] = section
    synthetic = out.get("synthetic", {})
    out["headline"] = {
        "vqa_accuracy": synthetic.get("vqa", {}).get("accuracy"),
        "vqa_accuracy_lenient": synthetic.get("vqa", {}).get("accuracy_lenient"),
        "refer_acc_iou50": synthetic.get("refer", {}).get("acc_iou50"),
        "by_type": {k: v["accuracy"] for k, v in synthetic.get("vqa", {}).get("by_type", {}).items()},
    }
    return out
