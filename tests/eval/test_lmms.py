"""lmms-eval integration: the `vtprune` model (entry point), the offline `vtprune_shapes` task, batching,
loglikelihood, sweeps through the Python API, the CLI and a 2-process `accelerate launch` on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra: pip install 'vtprune[eval]'")

from vtprune.eval import lmms, shapes, sweep  # noqa: E402

TASK = "vtprune_shapes"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tasks():
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(lmms.TASKS), include_defaults=False)


def evaluate(lm, tasks, limit, task=TASK):
    from lmms_eval.evaluator import simple_evaluate

    lm.reuse = True
    res = simple_evaluate(model=lm, tasks=[task], task_manager=tasks, limit=limit, log_samples=True,
                          bootstrap_iters=0, verbosity="WARNING")
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return res, [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]


def test_importing_vtprune_does_not_import_lmms_eval():
    code = ("import sys, vtprune, vtprune.cli, vtprune.eval.sweep, vtprune.eval.models; "
            "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("vtprune") is lmms.VtpruneChat  # lmms-eval prefers the chat class
    assert get_model("vtprune", force_simple=True) is lmms.Vtprune


def test_task_data_is_the_generators_held_out_set():
    shipped = [json.loads(line) for line in (lmms.TASKS / TASK / "shapes_eval.jsonl").read_text().splitlines()]
    assert shipped == shapes.eval_rows(1200)
    assert {r["kind"] for r in shipped} == set(shapes.KINDS)


def test_model_args_are_validated():
    with pytest.raises(ValueError, match="nope"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="nope", keep=4)
    with pytest.raises(TypeError, match="unknown option.*alpha"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", keep=4, alpha=0.5)
    with pytest.raises(ValueError, match="without a method"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, keep=4)
    with pytest.raises(ValueError, match="no processor"):
        lmms.Vtprune(pretrained="tiny-test-llava", method="random", keep=4)
    with pytest.raises(ValueError, match="dtype"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, dtype="int8")
    from lmms_eval.utils import simple_parse_args_string  # list options through --model_args, as lmms-eval parses them

    args = simple_parse_args_string("pretrained=tiny-llava,random_weights=true,method=transprune,keep=8,"
                                    "schedule=[[1,0.5],[2,0.25]]")
    assert lmms.Vtprune(**args).model._vtprune.method.config.schedule == [[1, 0.5], [2, 0.25]]
    # signed and exponent numbers arrive as floats; none as a string
    args = simple_parse_args_string("pretrained=tiny-llava,random_weights=true,method=hiprune,keep=1e1,"
                                    "deep_layer=-2,object_layer=none")
    assert isinstance(args["deep_layer"], float)
    config = lmms.Vtprune(**args).model._vtprune.method.config
    assert (config.keep, config.deep_layer, config.object_layer) == (10, -2, None)
    assert type(config.keep) is int and type(config.deep_layer) is int
    args = simple_parse_args_string("pretrained=tiny-llava,random_weights=true,method=vflowopt,keep=8,"
                                    "pixel_mean=[0.5,0.5,0.5]")
    assert lmms.Vtprune(**args).model._vtprune.method.config.pixel_mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2vl"])
def test_answers_do_not_depend_on_batch_or_protocol(name, tasks):
    """Batch 1 vs batch 3 (left padding, mixed image sizes for Qwen) and the simple vs chat protocol
    give the same answers; pruning figures are recorded per sample."""
    task = TASK if name == "tiny-llava" else "vtprune_shapes_dynres"
    kw = dict(pretrained=name, random_weights=True, method="divprune", ratio=0.25)
    torch.manual_seed(0)
    one = lmms.Vtprune(batch_size=1, **kw)
    res, answers = evaluate(one, tasks, 6, task)
    assert len(answers) == 6 and res["results"][task]["accuracy,none"] >= 0
    for cls, batch in ((lmms.Vtprune, 3), (lmms.VtpruneChat, 3)):
        other = cls(batch_size=batch, **kw)
        other.model.load_state_dict(one.model.state_dict())
        assert evaluate(other, tasks, 6, task)[1] == answers, (cls.__name__, batch)
    s = one.summary()
    assert s["samples"] == 6 and s["batches"] == 6
    assert s["kept_fraction"] == pytest.approx(0.25, abs=0.02)
    assert s["visual_after"] < s["visual_before"] and s["llm_prefill_tflops"] > 0
    if name == "tiny-llava":
        assert (s["visual_before"], s["visual_after"]) == (196, 49)
    assert res["throughput"]["avg_vtprune_visual_after"] == pytest.approx(s["visual_after"])


def test_unpatched_model_matches_keep_all(tasks):
    base = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, batch_size=2)
    full = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, batch_size=2, method="divprune", ratio=1.0)
    full.model.load_state_dict(base.model.state_dict())
    assert evaluate(base, tasks, 4)[1] == evaluate(full, tasks, 4)[1]
    assert base.summary()["visual_after"] == full.summary()["visual_after"] == 196


class _Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_continuations_log_probability():
    from vtprune.eval import tinyvlm

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", ratio=1.0)
    scene, qs = shapes.sample("eval", 3)
    doc = {"scene": 3}
    lm.task_dict = {"t": {"test": {0: doc}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    got = lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test"), _Req(qs[0].text, "red blue", visual, 0, "t", "test")])
    # reference: the unpatched model on the prompt with the continuation's tokens appended
    import vtprune

    vtprune.unpatch(lm.model)
    proc = lm.processor
    for (lp, greedy), cont in zip(got, ["red", "red blue"]):
        text = tinyvlm.prompt("llava", qs[0].text) + " " + cont
        inputs = proc(images=[shapes.render(scene)], text=[text], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        ids = inputs["input_ids"][0]
        n = len(cont.split())
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(**inputs).logits[0].float(), -1)
        ref = sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]] for i in range(n))
        assert lp == pytest.approx(float(ref), abs=1e-4)
        assert greedy == all(int(logp[len(ids) - n - 1 + i].argmax()) == int(ids[len(ids) - n + i]) for i in range(n))
    vtprune.patch(lm.model, "divprune", ratio=0.25)  # pruned: a different, finite log-probability
    lp, _ = lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test")])[0]
    assert lp != pytest.approx(got[0][0], abs=1e-6) and lp < 0


def test_loglikelihood_on_qwen_vl_extends_the_token_types():
    """Qwen-VL inputs carry mm_token_type_ids: the appended continuation is text there too (it raised an
    IndexError); keep-all gives the unpatched model's log-probability."""
    from vtprune.eval import tinyvlm

    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, method="divprune", ratio=1.0)
    scene, qs = shapes.sample("eval", 3)
    lm.task_dict = {"t": {"test": {0: {"scene": 3}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    (lp, _), = lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test")])
    inputs = lm.processor(images=[shapes.render(scene)], text=[tinyvlm.prompt("qwen2_vl", qs[0].text) + " red"],
                          return_tensors="pt")
    inputs.pop("token_type_ids", None)
    ids = inputs["input_ids"][0]
    import vtprune

    vtprune.unpatch(lm.model)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**inputs).logits[0, -2].float(), -1)
    assert lp == pytest.approx(float(logp[ids[-1]]), abs=1e-4)


def test_a_batch_without_images_reports_its_own_figures():
    """A text-only batch after a pruned one prunes nothing: its prompt lengths and visual-token figures
    are its own (they were the previous batch's, and the zip over them dropped an answer)."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", ratio=0.25, batch_size=2)
    # a chat template, as real checkpoints have, so that a prompt without an image is allowed
    lm.processor.chat_template = ("<s> {% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                                  "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    scene, qs = shapes.sample("eval", 3)
    lm.task_dict = {"t": {"test": {0: {}, 1: {}, 2: {}}}}
    image, none = (lambda d: [shapes.render(scene)]), (lambda d: [])
    gen = {"max_new_tokens": 3, "until": ["</s>"]}
    reqs = [_Req(qs[0].text, gen, image, 0, "t", "test"), _Req("what colour is the sky", gen, none, 1, "t", "test"),
            _Req("how many legs has a cat", gen, none, 2, "t", "test")]
    out = lm.generate_until(reqs)
    assert len(out) == 3 and all(o is not None for o in out)
    for r, o in zip(reqs[1:], out[1:]):
        real = lm._inputs([lm._prompt(r.args[0], 0)], [])["input_ids"].shape[1]
        assert o.token_counts.input_tokens == real
    figures = [(x["samples"], x["visual_before"], x["visual_after"]) for x in lm.records]
    assert sum(n for n, _, _ in figures) == 3 and sum(b for _, b, _ in figures) == 196  # one image of 196 tokens
    assert all(after == 0 for _, before, after in figures if before == 0)


def test_sweep_on_an_lmms_eval_task_resumes(tmp_path, monkeypatch):
    args = dict(model_name="tiny-llava", task=TASK, out=tmp_path, n_questions=4, batch=2, random_weights=True,
                progress=False)
    cells = sweep.run(methods=["divprune", "fastv"], ratios=[0.25], **args)
    assert [(c["method"], c["ratio"]) for c in cells] == [("none", 1.0), ("divprune", 0.25), ("fastv", 0.25)]
    assert [c["visual_tokens"] for c in cells] == [196, 49, 49]
    assert cells[1]["llm_tflops"] < cells[2]["llm_tflops"] < cells[0]["llm_tflops"]  # FastV prunes after layer 2
    assert set(cells[0]["by_kind"]) == {"colour", "shape", "count", "relation"}  # the first 4 questions' kinds
    monkeypatch.setattr(sweep, "LmmsCells", None)  # a resumed sweep with nothing missing builds no runner
    assert sweep.run(methods=["divprune", "fastv"], ratios=[0.25], **args) == cells
    with pytest.raises(ValueError, match="no task"):
        monkeypatch.undo()
        sweep.run(methods=["random"], ratios=[0.5], **{**args, "task": "vtprune_nope"})


def _cli(tmp_path, prefix, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    cmd = prefix + ["-m", "lmms_eval", "--model", "vtprune", "--model_args",
                    "pretrained=tiny-llava,random_weights=true,method=divprune,ratio=0.25,stats_path=" + str(tmp_path / "stats"),
                    "--include_path", str(lmms.TASKS), "--tasks", TASK, "--limit", "6", "--batch_size", "2",
                    "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    samples = [json.loads(line) for p in out.rglob("*_samples_*.jsonl") for line in p.read_text().splitlines()]
    assert len(results) == 1, list(out.rglob("*"))
    return results[0], sorted(samples, key=lambda s: s["doc_id"]), proc.stdout + proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_under_accelerate_and_two_process_torchrun(tmp_path):
    """`accelerate launch -m lmms_eval --model vtprune ...` offline (accelerate's CPU mode runs one
    process), then 2 data-parallel processes with torchrun, the launcher under accelerate's multi-GPU
    mode (gloo on the CPU): the same answers, documents split across ranks, each rank's figures on disk."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results, samples, _ = _cli(tmp_path / "single", accelerate)
    assert results["results"][TASK]["accuracy,none"] >= 0
    assert results["throughput"]["avg_vtprune_visual_after"] == 49
    assert len(samples) == 6
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    results2, samples2, log = _cli(tmp_path / "multi", torchrun)
    assert [s["doc_id"] for s in samples2] == list(range(6)), log[-2000:]
    assert [s["filtered_resps"] for s in samples2] == [s["filtered_resps"] for s in samples]
    assert results2["results"][TASK]["accuracy,none"] == results["results"][TASK]["accuracy,none"]
    ranks = sorted((tmp_path / "multi" / "stats").glob("vtprune_stats_rank*.json"))
    assert [p.name for p in ranks] == ["vtprune_stats_rank0.json", "vtprune_stats_rank1.json"]
    per_rank = [json.loads(p.read_text()) for p in ranks]
    assert [r["world_size"] for r in per_rank] == [2, 2]
    assert sum(r["samples"] for r in per_rank) == 6  # rank r takes documents r::2
    assert json.loads((tmp_path / "single" / "stats" / "vtprune_stats_rank0.json").read_text())["samples"] == 6


@pytest.mark.parametrize("name,image", [("tiny-llava", "<image> "),
                                        ("tiny-qwen2vl", "<|vision_start|> <|image_pad|> <|vision_end|> ")])
def test_chat_template_path_builds_the_same_prompt(name, image, tasks):
    """A checkpoint's chat template is applied to lmms-eval's messages (chat class) and to the simple
    class's one-turn prompt: with a template that writes the bundled format, answers are unchanged."""
    template = ("{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
                + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    task = TASK if name == "tiny-llava" else "vtprune_shapes_dynres"
    kw = dict(pretrained=name, random_weights=True, method="random", ratio=0.5, batch_size=3)
    plain = evaluate(lmms.Vtprune(**kw), tasks, 6, task)[1]
    for cls in (lmms.Vtprune, lmms.VtpruneChat):
        lm = cls(**kw)
        lm.processor.chat_template = template
        assert lm._prompt("what colour is the star ?", 1).split() == ["<s>", *image.split(), "what", "colour", "is",
                                                                      "the", "star", "?"]
        assert evaluate(lm, tasks, 6, task)[1] == plain, cls.__name__
