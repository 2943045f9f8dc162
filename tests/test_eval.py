"""Evaluation: metrics on hand-made predictions, every eval file format's reader, likelihood ranking, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.metrics import (
    answer_matches,
    hateful_label,
    normalize_answer,
    rank_by_likelihood,
    refer_hit,
    refer_hit_original,
    refer_iou,
    true_false,
    vizwiz_score,
    vqa_accuracy,
    vqa_exact,
    vqa_substring,
)
from training.data.text import caption_text
from training.eval_data import READERS, VQA_PROMPT, EvalDataError, EvalItem, read_refcoco, read_split_folder
from training.eval_score import summarize


# ---------------------------------------------------------------------------------------------- metrics
def test_normalize_answer_follows_the_vqa_rules() -> None:
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("  The RED circle ") == "red circle"
    assert normalize_answer("top-left") == "top left"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"


def test_vqa_exact_and_lenient() -> None:
    assert vqa_exact("Red.", ["red"]) == 1.0
    assert vqa_exact("three", ["3"]) == 1.0
    assert vqa_exact("dark red", ["red"]) == 0.0
    assert vqa_substring("it is dark red", "red") == 1.0  # the original GQA rule is lenient
    assert vqa_substring("blue", "red") == 0.0


def test_official_vqa_accuracy_by_hand() -> None:
    answers = ["red", "red"] + ["blue"] * 8
    # leave-one-out over 10: 2 subsets lose a "red" (1 match -> 1/3), 8 keep both (2 matches -> 2/3)
    assert vqa_accuracy("red", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("blue", answers) == 1.0
    assert vqa_accuracy("green", answers) == 0.0


def test_vizwiz_score_by_hand() -> None:
    answers = ["red", "red", "dark red", "blue", "unanswerable"]
    assert vizwiz_score("red", answers) == 1.0  # red, red, and "red" inside "dark red": 3 / 3
    assert vizwiz_score("blue", answers) == pytest.approx(1 / 3)
    assert vizwiz_score("dark red", answers) == 1.0  # "red" twice is inside it, and itself
    assert vizwiz_score("", answers) == 0.0


def test_refer_iou_rescales_the_grid_to_pixels() -> None:
    # 200 x 100 image: grid (10, 20, 50, 60) -> pixels (20, 20, 100, 60)
    assert refer_iou("{<10><20><50><60>}", (20, 20, 100, 60), 200, 100) == pytest.approx(1.0)
    # shifted by 40 px in x: intersection 40 x 40 = 1600, union 2 * 3200 - 1600 = 4800
    assert refer_iou("{<10><20><50><60>}", (60, 20, 140, 60), 200, 100) == pytest.approx(1 / 3)
    assert not refer_hit("{<10><20><50><60>}", (60, 20, 140, 60), 200, 100)
    assert refer_hit("answer: { <10> <20> <50> <60> }", (24, 20, 100, 60), 200, 100)  # spaces are removed first
    assert refer_iou("no box here", (0, 0, 10, 10), 100, 100) == 0.0
    # exactly 0.5: counted by Acc@IoU>=0.5, not by the original's strict > 0.5 with inclusive edges
    assert refer_hit("{<0><0><50><100>}", (0, 0, 100, 100), 100, 100)
    assert refer_iou("{<0><0><50><100>}", (0, 0, 100, 100), 100, 100, pixel_inclusive=True) == pytest.approx(
        51 * 101 / (101 * 101)
    )
    assert refer_hit_original("{<0><0><50><100>}", (0, 0, 100, 100), 100, 100)


def test_likelihood_ranking_and_yes_no_rules() -> None:
    assert rank_by_likelihood([2.0, 0.5, 0.5, 3.0]) == 1  # lowest loss, first on ties
    assert true_false("That is true.") == "true" and true_false("true or false") is None
    assert hateful_label("Yes, it is") == 1 and hateful_label("no") == 0


def _vqa(answer: str, pred: str, qtype: str) -> dict:
    return {
        "benchmark": "synthetic",
        "qid": pred,
        "task": "vqa",
        "qtype": qtype,
        "answers": [answer],
        "prediction": pred,
    }


def test_summary_by_hand() -> None:
    records = [
        _vqa("red", "red", "colour"),
        _vqa("circle", "a circle", "shape"),  # exact after dropping the article
        _vqa("2", "2 circles", "count"),  # lenient only
        _vqa("yes", "no", "exists"),
        _vqa("no", "no", "exists"),
        {"benchmark": "synthetic", "qid": "r1", "task": "refer", "qtype": "refer", "prediction": "{<0><0><50><50>}",
         "gt_xyxy": [0, 0, 50, 50], "width": 100, "height": 100},
        {"benchmark": "synthetic", "qid": "r2", "task": "refer", "qtype": "refer", "prediction": "{<50><50><99><99>}",
         "gt_xyxy": [0, 0, 50, 50], "width": 100, "height": 100},
        {"benchmark": "synthetic", "qid": "i1", "task": "identify", "qtype": "identify", "prediction": "red circle",
         "answers": ["large red circle"]},
    ]  # fmt: skip
    s = summarize(records)
    vqa = s["synthetic"]["vqa"]
    assert vqa["n"] == 5 and vqa["accuracy"] == 0.6 and vqa["accuracy_lenient"] == 0.8
    assert vqa["yes_no_accuracy"] == 0.5
    assert vqa["by_type"]["exists"] == {"n": 2, "accuracy": 0.5, "accuracy_lenient": 0.5}
    assert vqa["by_type"]["count"]["accuracy"] == 0.0 and vqa["by_type"]["count"]["accuracy_lenient"] == 1.0
    assert s["synthetic"]["refer"]["acc_iou50"] == 0.5 and s["synthetic"]["refer"]["parsed"] == 1.0
    assert s["synthetic"]["identify"] == {"n": 1, "accuracy": 0.0, "consistent": 1.0}
    assert s["headline"]["vqa_accuracy"] == 0.6 and s["headline"]["refer_acc_iou50"] == 0.5


# ---------------------------------------------------------------------------------------------- readers
def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in data))
    else:
        path.write_text(json.dumps(data))
    return path


def test_each_real_eval_format_is_read(tmp_path: Path) -> None:
    img = tmp_path / "img"
    gqa = READERS["gqa"](
        _write(
            tmp_path / "testdev_balanced_questions.json",
            [{"image": "n1.jpg", "question": "What Color is the car?", "answer": "red", "question_id": "q1"}],
        ),
        img,
    )
    assert gqa[0].image == img / "n1.jpg" and gqa[0].answers == ["red"]
    assert (
        gqa[0].instruction
        == "[vqa] Based on the image, respond to this question with a short answer: what color is the car?"
    )
    gqa_dict = READERS["gqa"](
        _write(tmp_path / "gqa_own.json", {"201": {"imageId": "n9", "question": "q?", "answer": "no"}}), img
    )
    assert gqa_dict[0].image == img / "n9.jpg" and gqa_dict[0].qid == "201"

    (img / "val2017").mkdir(parents=True)
    (img / "val2017" / "000000000139.jpg").write_bytes(b"")
    vsr = READERS["vsr"](
        _write(
            tmp_path / "vsr.jsonl",
            [{"image": "000000000139.jpg", "caption": "The cat is left of the dog.", "label": 1}],
        ),
        img,
    )
    assert vsr[0].image == img / "val2017" / "000000000139.jpg"  # looked up in train2017, then val2017
    assert vsr[0].instruction.endswith("true or false? The cat is left of the dog.") and vsr[0].answers == ["true"]

    icon = READERS["iconqa"](
        _write(
            tmp_path / "choose_text_val.json",
            [
                {"image_id": "7", "question": "Which is bigger?", "choices": ["cat", "dog"], "answer": "dog"},
                {"image_id": "8", "question": "How many?", "choices": "1_2_3", "answer": "2"},
            ],
        ),
        img,
    )
    assert icon[0].image == img / "7" / "image.png" and icon[0].choices == ["cat", "dog"] and icon[0].task == "choose"
    assert icon[1].choices == ["1", "2", "3"] and icon[0].instruction == "Which is bigger?"

    viz = READERS["vizwiz"](
        _write(
            tmp_path / "val.json",
            [
                {
                    "image": "VizWiz_val_0.jpg",
                    "question": "What is this?",
                    "answers": [{"answer": "soup", "answer_confidence": "yes"}, {"answer": "unanswerable"}],
                }
            ],
        ),
        img,
    )
    assert viz[0].answers == ["soup", "unanswerable"] and "'What is this?'" in viz[0].instruction

    hm = READERS["hateful_memes"](
        _write(
            tmp_path / "dev.jsonl", [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character"}]
        ),
        img,
    )
    assert hm[0].image == img / "img/42953.png" and hm[0].label == 0 and hm[0].answers == ["no"]
    assert hm[0].instruction.startswith("This is an image writting 'its their character'.")

    ref = read_refcoco(_write(tmp_path / "refcoco_val.json", [
        {"img_id": "COCO_train2014_000000580957_4", "sents": "Left Man", "bbox": [10, 20, 30, 40],
         "height": 480, "width": 640}]), img)  # fmt: skip
    assert ref[0].image == img / "COCO_train2014_000000580957.jpg"
    assert ref[0].gt_xyxy == (10, 20, 40, 60) and (ref[0].width, ref[0].height) == (640, 480)
    assert ref[0].instruction == "[refer] give me the location of left man"


def test_reader_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = _write(tmp_path / "val.json", [{"image": "x.jpg", "question": "q"}])
    with pytest.raises(EvalDataError, match=r"val.json: entry 0 has no 'answers' field"):
        READERS["vizwiz"](bad, tmp_path)
    with pytest.raises(EvalDataError, match="no such evaluation file"):
        READERS["gqa"](tmp_path / "missing.json", tmp_path)
    wrong = _write(tmp_path / "icon.json", [{"image_id": 1, "question": "q", "choices": ["a"], "answer": "b"}])
    with pytest.raises(EvalDataError, match="answer 'b' is not one of its choices"):
        READERS["iconqa"](wrong, tmp_path)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    from training.data.synthetic import SyntheticWorld
    from training.data.synthetic_writers import write_split

    out = tmp_path_factory.mktemp("eval_split") / "test"
    write_split(SyntheticWorld(0, 64), "test", 3, out, ("eval",))
    return out


def test_synthetic_split_folder_is_read(test_split: Path) -> None:
    entries = json.loads((test_split / "eval" / "synthetic_test.json").read_text())
    items = read_split_folder(test_split, "test", ("synthetic", "refcoco", "gqa"))
    synthetic = [it for it in items if it.benchmark == "synthetic"]
    assert len(synthetic) == len(entries)
    assert all(it.image.is_file() for it in items)
    vqa = next(it for it in synthetic if it.task == "vqa")
    question = next(e for e in entries if str(e["question_id"]) == vqa.qid)["question"]
    assert vqa.instruction == VQA_PROMPT.format(caption_text(question))  # cleaned as the VQA loaders clean it
    assert vqa.answers == [next(e for e in entries if str(e["question_id"]) == vqa.qid)["answer"]]
    refer = next(it for it in synthetic if it.task == "refer")
    entry = next(e for e in entries if str(e["question_id"]) == refer.qid)
    x, y, w, h = entry["bbox"]
    assert refer.gt_xyxy == (x, y, x + w, y + h)
    refcoco = json.loads((test_split / "eval" / "refcoco_test.json").read_text())
    assert len([it for it in items if it.benchmark == "refcoco"]) == len(refcoco)


# ---------------------------------------------------------------------------------------------- the runner
def test_likelihood_ranking_with_a_stub_scorer(monkeypatch, tiny_model_dir: Path, tmp_path: Path) -> None:
    from training.eval import Evaluator

    stub = {"cat": 1.5, "dog": 0.25, "bird": 0.5}
    monkeypatch.setattr(Evaluator, "candidate_losses", lambda self, item, choices: [stub[c] for c in choices])
    item = EvalItem("iconqa", "1", tmp_path / "x.png", "Which?", "choose", ["dog"], choices=["cat", "dog", "bird"])
    evaluator = Evaluator.__new__(Evaluator)  # no model: the stub is the only scorer
    evaluator.batch_size = 4
    (record,) = Evaluator.run(evaluator, [item])
    assert record["prediction"] == "dog" and record["losses"] == [1.5, 0.25, 0.5]
    assert summarize([record])["iconqa"]["likelihood"] == {"n": 1, "accuracy": 1.0}


def test_candidate_loss_equals_the_model_loss(tiny_model_dir: Path, test_split: Path) -> None:
    import torch

    from core.model import TinyGPTV
    from training.eval import Evaluator

    model = TinyGPTV.from_pretrained(tiny_model_dir)
    tokenizer = model.load_tokenizer(tiny_model_dir)
    evaluator = Evaluator(model, tokenizer)
    item = read_split_folder(test_split, "test", ("synthetic",))[0]
    losses = evaluator.candidate_losses(item, ["red", "blue circle"])
    for choice, loss in zip(["red", "blue circle"], losses):
        prompt = evaluator.prompt_ids(item)
        ids = torch.tensor([prompt + tokenizer.encode(choice) + [0]])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt) :] = ids[0, len(prompt) :]
        with torch.no_grad():
            ref = model(ids, torch.ones_like(ids), labels=labels, image_features=evaluator.features([item]))["loss"]
        assert loss == pytest.approx(float(ref), abs=1e-5)


def test_cli_end_to_end_on_the_tiny_model(tiny_model_dir: Path, test_split: Path, tmp_path: Path) -> None:
    from training.eval import main

    out, preds = tmp_path / "eval.json", tmp_path / "preds.jsonl"
    code = main(["--model", str(tiny_model_dir), "--split", "test", "--data", str(test_split), "--out", str(out),
                 "--predictions", str(preds), "--image-size", "32", "--max-new-tokens", "4", "--likelihood"])  # fmt: skip
    assert code == 0
    summary = json.loads(out.read_text())
    entries = json.loads((test_split / "eval" / "synthetic_test.json").read_text())
    n_vqa = sum(e["task"] == "vqa" for e in entries)
    assert summary["synthetic"]["vqa"]["n"] == n_vqa
    assert summary["synthetic"]["refer"]["n"] == sum(e["task"] == "refer" for e in entries)
    assert summary["gqa"]["vqa"]["n"] == n_vqa  # the writer puts the same questions in GQA's format
    assert 0.0 <= summary["synthetic"]["vqa"]["likelihood_accuracy"] <= 1.0
    assert summary["timing"]["image_size"] == 32
    lines = preds.read_text().splitlines()
    assert len(lines) == summary["timing"]["items"] and "prediction" in json.loads(lines[0])


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    from training.eval import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path), "--out", str(tmp_path / "e.json")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith("is not a model folder (no config.json)")


def test_answer_matches_scores_text_and_boxes():
    assert answer_matches("The Red.", "red") and not answer_matches("blue", "red")
    assert answer_matches("two", "2")  # official VQA normalisation: number words -> digits
    assert answer_matches("{<10><10><50><50>}", "{<12><10><50><52>}")  # IoU 0.91
    assert not answer_matches("{<60><60><90><90>}", "{<10><10><50><50>}") and not answer_matches(
        "red", "{<1><1><9><9>}"
    )
