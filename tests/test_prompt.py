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
    # public facts need the ParaRel folder they are drawn from, asked before anything loads
    assert main(["prompt", "transfer", "--task", str(one), "--from", "nowhere", "--prompt",
                 str(tmp_path / "gpt2_prompt"), "--public", "facts", "--out",
                 str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pararel" in err[0] and not (tmp_path / "moved").exists()


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


def test_the_fluency_term_reaches_each_token_also_as_the_one_predicted():
    from engramlab.prompt.pez import project, prompt_nll

    lm = make_tiny("llama")
    torch.manual_seed(0)
    ids, hard = project(lm, torch.randn(4, lm.d_model))
    p = hard.clone().requires_grad_(True)
    tau = 0.05
    both = prompt_nll(lm, p, ids, temperature=tau)
    context_only = prompt_nll(lm, p, ids)
    # the straight-through target leaves the term's value alone
    assert float(both.detach()) == pytest.approx(float(context_only.detach()), rel=1e-6)
    (g_both,) = torch.autograd.grad(both, p)
    q = p.detach().clone().requires_grad_(True)
    (g_ctx,) = torch.autograd.grad(prompt_nll(lm, q, ids), q)
    # the last position is nobody's context: only its role as a predicted token moves it
    assert float(g_ctx[-1].abs().max()) == 0
    assert float(g_both[-1].norm()) > 0
    # and the step it gets raises the expected log-likelihood of the token it now stands for
    emb = F.normalize(lm.model.get_input_embeddings().weight.detach().float(), dim=-1)
    with torch.no_grad():
        logq = lm.model(inputs_embeds=hard[None]).logits[0, -2].log_softmax(-1)

    def expected(last: torch.Tensor) -> float:
        return float(((F.normalize(last, dim=-1) @ emb.T / tau).softmax(-1) * logq).sum())

    step = 1e-2 * g_both[-1] / g_both[-1].norm()
    assert expected(hard[-1] - step) > expected(hard[-1]) > expected(hard[-1] + step)
    # settings the term cannot run with are refused with the fix named
    from engramlab.prompt.pez import PEZConfig
    with pytest.raises(InputError, match="use one of both, context"):
        PEZConfig(fluency_roles="target").check()
    with pytest.raises(InputError, match="temperature must be above 0"):
        PEZConfig(fluency_temperature=0.0).check()


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_a_prefix_of_real_tokens_reads_as_those_tokens_before_the_text(family):
    from engramlab.prompt.prefix import initial_prefix, prefix_logits

    lm = make_tiny(family)
    states = initial_prefix(lm, 3, seed=4)
    drawn = torch.randint(lm.model.get_input_embeddings().weight.shape[0], (3,),
                          generator=torch.Generator().manual_seed(4)).tolist()
    texts = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
    ids = label_ids(lm, ["w40", "w41", "w42"])
    with torch.no_grad():
        ours = prefix_logits(lm, states, texts, ids)
        whole = torch.stack([lm.model(input_ids=torch.tensor(
            [drawn + lm.tokenizer(t)["input_ids"]])).logits[0, -1, ids] for t in texts])
        plain = label_logits(lm, None, texts, ids)
    # the keys and values the drawn tokens leave, at their positions: the text comes after them
    assert torch.allclose(ours, whole, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)
    assert torch.equal(prefix_logits(lm, states[:0], texts, ids), label_logits(lm, None, texts,
                                                                               ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_saved_prefix_is_a_peft_adapter_that_peft_reads_to_the_same_logits(tmp_path, family):
    from peft import PeftModel

    from engramlab.prompt import Prefix, load_prompt
    from engramlab.prompt.prefix import prefix_logits

    lm = make_tiny(family)
    heads = lm.model.config.num_key_value_heads if family == "llama" else 4
    width = 2 * lm.n_layers * heads * (lm.d_model // 4)
    prefix = Prefix(torch.randn(5, width), {"task": "toy"})
    prefix.save(tmp_path / "p", lm)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 5
    back = load_prompt(tmp_path / "p", lm)
    assert isinstance(back, Prefix) and torch.equal(back.states, prefix.states)
    texts = ["w5 w6 w7", "w8 w9"]
    ids = label_ids(lm, ["w40", "w41"])
    with torch.no_grad():
        ours = prefix_logits(lm, back.states, texts, ids)
        peft_model = PeftModel.from_pretrained(make_tiny(family).model, tmp_path / "p")
        for i, text in enumerate(texts):
            x = lm.tokenizer(text, return_tensors="pt")
            assert torch.allclose(peft_model(**x).logits[0, -1, ids], ours[i], atol=1e-5)


@pytest.mark.parametrize("reparam", [0, 16])
def test_prefix_tuning_lowers_the_loss_and_leaves_the_weights_as_they_were(reparam):
    from engramlab.models.kv import kv_geometry
    from engramlab.prompt import PrefixConfig, tune_prefix
    from engramlab.prompt.prefix import Reparam, initial_prefix, prefix_logits

    lm = make_tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    task = _task()
    ids = label_ids(lm, task.labels)
    config = PrefixConfig(tokens=3, steps=30, lr=0.05 if not reparam else 0.01, batch_size=8,
                          eval_every=5, seed=0, reparam=reparam)
    prefix = tune_prefix(lm, task, config)

    def loss(states):
        with torch.no_grad():
            logits = prefix_logits(lm, states, [task.template.format(r.text) for r in task.train],
                                   ids)
        want = torch.tensor([task.labels.index(r.label) for r in task.train])
        return float(F.cross_entropy(logits, want))

    if reparam:  # where the MLP starts
        heads, dim = kv_geometry(lm)
        with torch.no_grad():
            start = Reparam(3, heads * dim, reparam, 2 * lm.n_layers * heads * dim, 0)()
    else:
        start = initial_prefix(lm, 3, 0)
    assert loss(prefix.states) < 0.95 * loss(start)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    best = max(h["val_accuracy"] for h in prefix.meta["history"])
    assert prefix.meta["val_accuracy"] == best
    assert accuracy(lm, prefix, task, task.val) == pytest.approx(best)


def test_the_prefix_commands_run_end_to_end_and_refuse_what_a_prefix_cannot_do(tmp_path,
                                                                                 capsys):
    from engramlab.prompt import Prefix

    model = make_tiny("llama").save(tmp_path / "tiny")
    task_file = tmp_path / "task.jsonl"
    task = _task()
    task_file.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n"
                                 for r in task.train + task.val + task.test))
    common = ["--model", str(model), "--task", str(task_file)]

    def run(*argv):
        capsys.readouterr()
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tuned = run("prompt", "tune", *common, "--method", "prefix", "--tokens", "2", "--steps", "4",
                "--eval-every", "2", "--out", str(tmp_path / "p"))
    assert tuned["method"] == "prefix" and tuned["tokens"] == 2
    assert isinstance(Prefix.load(tmp_path / "p"), Prefix)
    scored = run("prompt", "eval", *common, "--prompt", str(tmp_path / "p"))
    assert scored["split"] == "test" and 0 <= scored["accuracy"] <= 1
    private = run("prompt", "tune", *common, "--method", "prefix", "--tokens", "2", "--steps",
                  "2", "--eval-every", "2", "--dp-epsilon", "8", "--out", str(tmp_path / "dp"))
    assert private["dp"]["noise_multiplier"] > 0
    refused = [
        ["prompt", "show", str(tmp_path / "p"), "--model", str(model)],
        ["prompt", "tune", *common, "--reparam", "8", "--out", str(tmp_path / "x1")],
        ["prompt", "tune", *common, "--method", "prefix", "--fluency", "1",
         "--out", str(tmp_path / "x2")],
        ["prompt", "tune", *common, "--method", "prefix", "--reparam", "8", "--dp-epsilon", "8",
         "--out", str(tmp_path / "x3")],
        ["prompt", "transfer", "--from", str(model), "--to", str(model), "--task",
         str(task_file), "--prompt", str(tmp_path / "p"), "--out", str(tmp_path / "x4")],
    ]
    for argv in refused:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("engram: error:"), err
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 5))
    # a prefix made for another model
    other = make_tiny("gpt2")
    Prefix(torch.randn(2, 2 * other.n_layers * other.d_model)).save(tmp_path / "gpt2", other)
    with pytest.raises(InputError, match="made for another model"):
        Prefix.load(tmp_path / "gpt2", make_tiny("llama"))


def test_public_facts_leave_out_the_tasks_subjects_and_for_the_relation_task_its_relations(
        tmp_path):
    from engramlab.prompt.tasks import LabelRow, LabelTask, public_facts

    (tmp_path / "patterns").mkdir()
    (tmp_path / "trex").mkdir()
    triples = {"P19": ("[X] was born in [Y].", [("Ann", "Rome"), ("Eve", "Oslo")]),
               "P1": ("[X] works for [Y].", [("Ann", "Acme"), ("Bob", "Initech")]),
               "P2": ("[X] speaks [Y].", [("Cy", "Welsh"), ("Ann", "Dutch")])}
    for rel, (pattern, pairs) in triples.items():
        (tmp_path / "patterns" / f"{rel}.jsonl").write_text(json.dumps({"pattern": pattern}))
        (tmp_path / "trex" / f"{rel}.jsonl").write_text("\n".join(
            json.dumps({"sub_label": s, "obj_label": o}) for s, o in pairs))
    rows = [LabelRow("Ann was born in Rome.", "birth")]
    relation = LabelTask("relation", ["birth", "death"], rows, rows, rows)
    assert sorted(public_facts(tmp_path, relation, 10)) == ["Bob works for Initech.",
                                                            "Cy speaks Welsh."]
    # any other task keeps every relation; its rows' subjects stay out all the same
    other = LabelTask("mine", ["a", "b"], rows, rows, rows)
    assert sorted(public_facts(tmp_path, other, 10)) == [
        "Bob works for Initech.", "Cy speaks Welsh.", "Eve was born in Oslo."]
    assert len(public_facts(tmp_path, other, 2)) == 2
    every = [LabelRow(f"{s} x", "a") for s in ("Ann", "Bob", "Cy", "Eve")]
    with pytest.raises(InputError, match="no fact outside"):
        public_facts(tmp_path, LabelTask("mine", ["a", "b"], every, every, every), 10)
