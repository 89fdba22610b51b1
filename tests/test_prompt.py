"""Soft prompts on tiny models: the readout, tuning, the PEFT folder and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engramlab.cli import main
from engramlab.errors import InputError
from engramlab.prompt import (
    LabelRow,
    LabelTask,
    SoftPrompt,
    TuneConfig,
    accuracy,
    label_ids,
    label_logits,
    nearest_ids,
    tune,
)
from engramlab.prompt.tasks import jsonl_task, load_label_task
from tests.conftest import make_tiny


def _task(n: int = 48, seed: int = 0) -> LabelTask:
    """Label w40 when the text starts with w5, else w41 (three in four rows are w41)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(6, 30, (4,), generator=g)]
        first = "w5" if i % 4 == 0 else words[0]
        rows.append(LabelRow(" ".join([first, *words[1:]]), "w40" if first == "w5" else "w41"))
    return LabelTask("toy", ["w40", "w41"], rows[:32], rows[32:40], rows[40:], template="{} w3")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_label_logits_without_a_prompt_are_the_models_next_token_logits(family):
    lm = make_tiny(family)
    texts = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13 w14"]
    ids = label_ids(lm, ["w40", "w41", "w42"])
    full = lm.next_token_logits(texts)[:, ids]
    with torch.no_grad():
        none = label_logits(lm, None, texts, ids)
        empty = label_logits(lm, torch.zeros(0, lm.d_model), texts, ids)
    assert torch.allclose(none, full, atol=1e-5)
    # a prompt of length zero changes nothing
    assert torch.allclose(empty, full, atol=1e-5)
    # and a real one does: it is read before the text
    with torch.no_grad():
        some = label_logits(lm, torch.randn(3, lm.d_model), texts, ids)
    assert not torch.allclose(some, full, atol=1e-3)


def test_a_saved_prompt_is_a_peft_adapter_that_peft_reads_to_the_same_logits(tmp_path):
    from peft import PeftModel

    lm = make_tiny("llama")
    prompt = SoftPrompt(torch.randn(4, lm.d_model), {"task": "toy"})
    prompt.save(tmp_path / "p", lm)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    back = SoftPrompt.load(tmp_path / "p", lm)
    assert torch.equal(back.embeddings, prompt.embeddings)
    texts = ["w5 w6 w7", "w8 w9"]
    ids = label_ids(lm, ["w40", "w41"])
    with torch.no_grad():
        ours = label_logits(lm, back.embeddings, texts, ids)
        peft_model = PeftModel.from_pretrained(make_tiny("llama").model, tmp_path / "p")
        for i, text in enumerate(texts):
            x = lm.tokenizer(text, return_tensors="pt")
            logits = peft_model(**x).logits[0, -1, ids]
            assert torch.allclose(logits, ours[i], atol=1e-4)


def test_tuning_lowers_the_loss_and_keeps_the_best_validation_prompt():
    lm = make_tiny("llama")
    task = _task()
    ids = label_ids(lm, task.labels)
    config = TuneConfig(tokens=4, steps=30, lr=0.05, batch_size=8, eval_every=5, seed=0)
    seen = []
    prompt = tune(lm, task, config, on_step=seen.append)

    def loss(p):
        with torch.no_grad():
            logits = label_logits(lm, p, [task.template.format(r.text) for r in task.train], ids)
        want = torch.tensor([task.labels.index(r.label) for r in task.train])
        return float(F.cross_entropy(logits, want))

    from engramlab.prompt.soft import initial_prompt

    assert loss(prompt.embeddings) < 0.95 * loss(initial_prompt(lm, 4, 0))
    history = prompt.meta["history"]
    assert len(history) == 6 and sum("loss" in s for s in seen) == 30
    best = max(h["val_accuracy"] for h in history)
    assert prompt.meta["val_accuracy"] == best
    # the kept prompt is the one that scored it
    assert accuracy(lm, prompt, task, task.val) == pytest.approx(best)


def test_nearest_ids_return_the_tokens_whose_embeddings_are_nearest():
    lm = make_tiny("llama")
    emb = lm.model.get_input_embeddings().weight
    picked = torch.tensor([7, 20, 33])
    noisy = emb[picked] * 3.0 + 1e-3 * torch.randn(3, lm.d_model)
    ids, cos = nearest_ids(lm, noisy)
    assert ids[:, 0].tolist() == picked.tolist()
    assert bool((cos[:, 0] > 0.99).all())


def test_bad_tasks_and_prompts_get_one_line_errors(tmp_path, capsys):
    lm = make_tiny("llama")
    no_label = tmp_path / "no_label.jsonl"
    no_label.write_text('{"text": "w5 w6"}\n')
    with pytest.raises(InputError, match="no \"label\""):
        jsonl_task(no_label)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"w{i}", "label": "a"}) + "\n"
                           for i in range(12)))
    with pytest.raises(InputError, match="1 distinct label"):
        jsonl_task(one)
    # two labels that start with the same token cannot be told apart
    with pytest.raises(InputError, match="start with the same token"):
        label_ids(lm, ["w40 w41", "w40 w42"])
    with pytest.raises(InputError, match="--pararel"):
        load_label_task("fact-check")
    # a prompt for another model
    other = make_tiny("gpt2")
    SoftPrompt(torch.randn(2, other.d_model)).save(tmp_path / "gpt2_prompt", other)
    with pytest.raises(InputError, match="made for another model"):
        SoftPrompt.load(tmp_path / "gpt2_prompt", lm)
    assert main(["prompt", "eval", "--task", str(no_label), "--prompt",
                 str(tmp_path / "gpt2_prompt")]) == 2
    assert main(["prompt", "show", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("engram: error:") for line in err)
    with pytest.raises(InputError, match="--tokens must be at least 1"):
        TuneConfig(tokens=0).check()
    # DP-SGD has no readability term: refused before any model loads
    assert main(["prompt", "tune", "--task", str(no_label), "--dp-epsilon", "8",
                 "--fluency", "1", "--out", str(tmp_path / "dp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dp-epsilon" in err[0] and not (tmp_path / "dp").exists()


def test_a_tuned_prompt_beats_zero_shot_on_held_out_relation_sentences(smol, shared_data):
    from engramlab.prompt.tasks import relation_task

    task = relation_task(shared_data / "pararel", caps=(2000, 80, 120))
    config = TuneConfig(tokens=10, steps=25, lr=0.003, batch_size=8, eval_every=25)
    prompt = tune(smol, task, config)
    tuned, zero = accuracy(smol, prompt, task, task.test), accuracy(smol, None, task, task.test)
    # test sentences: subjects and wordings no training sentence has
    assert tuned > zero + 0.2


def test_pez_projection_and_prompt_perplexity():
    from engramlab.prompt.pez import PEZConfig, pez, project, prompt_nll, readability

    lm = make_tiny("llama")
    emb = lm.model.get_input_embeddings().weight
    vectors = torch.randn(5, lm.d_model)
    ids, hard = project(lm, vectors)
    # real token ids, whose embeddings are the rows returned, nearest by cosine among all rows
    assert torch.equal(hard, emb[ids].float())
    cos = F.normalize(vectors, dim=-1) @ F.normalize(emb.float(), dim=-1).T
    assert torch.equal(ids, cos.argmax(-1))
    # the prompt's perplexity read from its embeddings is the model's loss on its tokens
    with torch.no_grad():
        logits = lm.model(input_ids=ids[None]).logits[0, :-1]
        want = F.cross_entropy(logits, ids[1:])
        assert float(prompt_nll(lm, hard, ids)) == pytest.approx(float(want), rel=1e-5)
    task = _task()
    prompt = pez(lm, task, PEZConfig(tokens=3, steps=10, eval_every=5, batch_size=8))
    # a hard prompt: every vector is its token's embedding
    assert torch.equal(prompt.embeddings, emb[torch.tensor(prompt.meta["ids"])].float())
    assert prompt.meta["val_accuracy"] == pytest.approx(accuracy(lm, prompt, task, task.val))
    seen = readability(lm, prompt.embeddings, task, task.val)
    assert seen["projected_accuracy"] == seen["accuracy"]  # projecting a hard prompt is a no-op


def test_the_prompt_commands_run_end_to_end_on_a_model_folder(tmp_path, capsys):
    from tests.conftest import tiny_text

    model = make_tiny("llama").save(tmp_path / "tiny")
    task_file = tmp_path / "task.jsonl"
    task = _task()
    rows = task.train + task.val + task.test
    task_file.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n"
                                 for r in rows))
    corpus = tmp_path / "public.txt"
    corpus.write_text("\n\n".join(" . ".join(tiny_text(8, seed=10 * d + i) for i in range(5))
                                  for d in range(4)))  # 4 documents of 5 sentences

    def run(*argv):
        capsys.readouterr()
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    common = ["--task", str(task_file)]
    tuned = run("prompt", "tune", "--model", str(model), *common, "--tokens", "3", "--steps", "4",
                "--eval-every", "2", "--out", str(tmp_path / "p"))
    assert tuned["split"] == "val" and (tmp_path / "p" / "adapter_config.json").is_file()
    scored = run("prompt", "eval", "--model", str(model), *common, "--prompt",
                 str(tmp_path / "p"))
    assert set(scored) == {"task", "split", "n", "accuracy", "zero_shot_accuracy"}
    assert scored["split"] == "test" and scored["n"] == len(jsonl_task(task_file).test)
    shown = run("prompt", "show", str(tmp_path / "p"), "--model", str(model), "-k", "2")
    assert len(shown["positions"]) == 3 and len(shown["positions"][0]) == 2
    student = run("prompt", "distil", "--model", str(model), "--keep", "2", "--steps", "2",
                  "--batch-size", "2", "--seq-len", "8", "--corpus", str(corpus),
                  "--out", str(tmp_path / "student"))
    assert student["blocks"] == 2
    private = run("prompt", "tune", "--model", str(tmp_path / "student"), *common, "--tokens",
                  "3", "--steps", "3", "--eval-every", "3", "--dp-epsilon", "8",
                  "--out", str(tmp_path / "ps"))
    assert private["dp"]["epsilon"] == 8 and private["dp"]["noise_multiplier"] > 0
    moved = run("prompt", "transfer", "--from", str(tmp_path / "student"), "--to", str(model),
                "--prompt", str(tmp_path / "ps"), *common, "--public", str(corpus),
                "--n-public", "8", "--steps", "2", "--eval-every", "2",
                "--out", str(tmp_path / "moved"))
    assert moved["public"] == 8
    assert SoftPrompt.load(tmp_path / "moved", make_tiny("llama")).length == 3
