"""lmms-eval integration: the `vtprune` model (entry point), the offline `vtprune_shapes` task, batching,
loglikelihood, sweeps through the Python API, the CLI and a 2-process `accelerate launch` on the CPU;
videos: frame sampling from files (vtprune.eval.clips), the `vtprune_shapes_video` task on the trained
tiny-qwen2vl, and local LLaVA-NeXT-Video / Qwen2.5-VL / Qwen3-VL checkpoints."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra: pip install 'vtprune[eval]'")

from vtprune import tiny  # noqa: E402
from vtprune.eval import clips, lmms, shapes, sweep, tinyvlm  # noqa: E402

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


def test_a_config_file_names_the_method_when_model_args_give_none(tmp_path):
    """config=FILE without method= takes the file's method, as patch(model, config=FILE) does; an explicit
    budget replaces the file's; method=none beside a config is refused."""
    import json

    from lmms_eval.utils import simple_parse_args_string

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"method": "vflowopt", "options": {"ratio": 0.25, "r2": 0.9, "alpha": 0.5}}))
    model = lmms.Vtprune(**simple_parse_args_string(f"pretrained=tiny-llava,random_weights=true,config={path},keep=40"))
    state = model.model._vtprune
    assert (state.method_name, state.method.config.keep, state.method.config.ratio) == ("vflowopt", 40, None)
    assert (state.method.config.r2, state.method.config.alpha) == (0.9, 0.5)
    with pytest.raises(ValueError, match="without a method"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="none", config=str(path))
    (tmp_path / "none.json").write_text(json.dumps({"options": {"ratio": 0.25}}))
    with pytest.raises(ValueError, match="without a method"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, config=str(tmp_path / "none.json"))


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


def test_loglikelihood_is_the_continuations_mean_loss():
    from vtprune.eval import tinyvlm

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", ratio=1.0)
    scene, qs = shapes.sample("eval", 3)
    doc = {"scene": 3}
    lm.task_dict = {"t": {"test": {0: doc}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    got = [r.text for r in lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test"),
                                             _Req(qs[0].text, "red blue", visual, 0, "t", "test")])]
    # reference: the unpatched model on the prompt with the continuation's tokens appended
    import vtprune

    vtprune.unpatch(lm.model)
    proc = lm.processor
    for (loss, greedy), cont in zip(got, ["red", "red blue"]):
        text = tinyvlm.prompt("llava", qs[0].text) + " " + cont
        inputs = proc(images=[shapes.render(scene)], text=[text], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        ids = inputs["input_ids"][0]
        n = len(cont.split())
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(**inputs).logits[0].float(), -1)
        ref = -sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]] for i in range(n)) / n
        assert loss == pytest.approx(float(ref), abs=1e-4)
        assert greedy == all(int(logp[len(ids) - n - 1 + i].argmax()) == int(ids[len(ids) - n + i]) for i in range(n))
    vtprune.patch(lm.model, "divprune", ratio=0.25)  # pruned: a different, finite log-probability
    loss, _ = lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test")])[0].text
    assert loss != pytest.approx(got[0][0], abs=1e-6) and loss > 0


def _red_loss_and_inputs(lm, family):
    """The plugin's loglikelihood of the continuation "red" after the first question of eval scene 3, and
    the processor's inputs of that scene with the question's prompt + " red" (to score it directly)."""
    scene, qs = shapes.sample("eval", 3)
    lm.task_dict = {"t": {"test": {0: {"scene": 3}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    (loss, _), = (r.text for r in lm.loglikelihood([_Req(qs[0].text, "red", visual, 0, "t", "test")]))
    inputs = lm.processor(images=[shapes.render(scene)], text=[tinyvlm.prompt(family, qs[0].text) + " red"],
                          return_tensors="pt")
    inputs.pop("token_type_ids", None)
    return loss, inputs


def test_loglikelihood_on_qwen_vl_extends_the_token_types():
    """Qwen-VL inputs carry mm_token_type_ids: the appended continuation is text there too (it raised an
    IndexError); keep-all gives the unpatched model's log-probability."""
    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, method="divprune", ratio=1.0)
    loss, inputs = _red_loss_and_inputs(lm, "qwen2_vl")
    ids = inputs["input_ids"][0]
    import vtprune

    vtprune.unpatch(lm.model)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**inputs).logits[0, -2].float(), -1)
    assert loss == pytest.approx(-float(logp[ids[-1]]), abs=1e-4)


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
    # a preset's cell counts its own options: fastv scoring at layer 1 drops a layer sooner than fastv's own 2
    early = sweep.run(methods=[], ratios=[0.25], presets=[("fastv", {"layer": 1}, "early")], **args)[-1]
    assert early["options"] == {"layer": 1} and cells[1]["llm_tflops"] < early["llm_tflops"] < cells[2]["llm_tflops"]
    runner = sweep.LmmsCells("tiny-llava", TASK, 2, 2, True, device="cpu")  # what its FLOPs and stats file read
    runner.cell("fastv", 0.5, {"layer": 1})
    assert runner.lm.summary()["options"] == {"ratio": 0.5, "layer": 1}
    monkeypatch.setattr(sweep, "LmmsCells", None)  # a resumed sweep with nothing missing builds no runner
    assert sweep.run(methods=["divprune", "fastv"], ratios=[0.25], **args) == cells
    with pytest.raises(ValueError, match="no task"):
        monkeypatch.undo()
        sweep.run(methods=["random"], ratios=[0.5], **{**args, "task": "vtprune_nope"})


def test_lmms_sweep_cells_hand_vflowopt_the_processors_pixel_normalisation(siglip_normalised):
    """As the plugin does on its own (test_vflowopt_reads_the_processors_pixel_normalisation_unless_given), a
    sweep's re-patched cells give vflowopt the processor's pixel_mean / pixel_std unless a preset sets them."""
    from vtprune.methods.vflowopt import VFlowOptConfig

    runner = sweep.LmmsCells("tiny-llava", TASK, 2, 2, True, device="cpu")
    seen = []

    def evaluate(model, **kwargs):
        config = model.model._vtprune.method.config
        seen.append((config.pixel_mean, config.pixel_std))
        raise KeyboardInterrupt  # (the evaluation itself is tested above)

    runner.evaluate = evaluate
    for options in (None, {"pixel_std": (0.2, 0.2, 0.2)}):
        with pytest.raises(KeyboardInterrupt):
            runner.cell("vflowopt", 0.5, options)
    assert seen == [((0.5,) * 3, (0.5,) * 3), (VFlowOptConfig(keep=1).pixel_mean, (0.2,) * 3)]
    assert runner.lm.options == {"ratio": 0.5, "pixel_std": (0.2, 0.2, 0.2)}  # as given: what its summary says


@pytest.mark.parametrize("model, task", [("tiny-llava", TASK), ("tiny-qwen2vl", TASK + "_dynres")])
def test_the_first_n_questions_are_the_ones_shapes_scores(tmp_path, model, task):
    """`--questions n` on vtprune_shapes (lmms-eval's limit: the data file's first n lines) scored other
    questions than on `shapes` (a balanced eval_set(n)): 0.678 vs 0.689 for hiprune at 0.25, n = 90."""
    assert all(shapes.eval_set(n) == shapes.eval_set(1200)[:n] for n in (7, 36, 90))
    args = dict(model_name=model, methods=["hiprune"], ratios=[0.25], n_questions=36, batch=12, progress=False)
    ours = sweep.run(task="shapes", out=tmp_path / "shapes", **args)
    theirs = sweep.run(task=task, out=tmp_path / "lmms", **args)
    assert [(c["accuracy"], c["by_kind"]) for c in theirs] == [(c["accuracy"], c["by_kind"]) for c in ours]
    assert ours[0]["accuracy"] != ours[1]["accuracy"]  # (a real difference to agree on)


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


def test_multiple_choice_task_runs_end_to_end(tasks):
    """The bundled multiple-choice task through lmms-eval's evaluator: loglikelihood results survive
    its output unwrapping (a bare (loss, greedy) tuple became a string), the smallest loss is the
    answer (a log-probability made the trained model score ~0), keep-all equals unpatched."""
    from lmms_eval.evaluator import simple_evaluate

    def run(**kw):
        lm = lmms.Vtprune(pretrained="tiny-llava", **kw)
        res = simple_evaluate(model=lm, tasks=["vtprune_shapes_mc"], task_manager=tasks, limit=12, log_samples=True,
                              bootstrap_iters=0, verbosity="WARNING")
        samples = sorted(res["samples"]["vtprune_shapes_mc"], key=lambda s: s["doc_id"])
        return res["results"]["vtprune_shapes_mc"]["acc,none"], [s["resps"] for s in samples], lm.summary()

    acc, resps, s = run()
    assert acc >= 0.9  # the trained model (0.98 on 60 questions)
    assert s["samples"] == sum(len(r) for r in resps) and s["visual_after"] == 196  # one forward per choice
    acc_all, resps_all, _ = run(method="divprune", keep=196)
    assert (acc_all, resps_all) == (acc, resps)
    _, _, pruned = run(method="divprune", ratio=0.25)
    assert pruned["visual_after"] == 49 and pruned["llm_prefill_tflops"] < s["llm_prefill_tflops"]


def _three(lm):
    """Three generate_until requests of different prompt lengths, one image each."""
    lm.task_dict = {"t": {"test": {i: {"scene": i} for i in range(3)}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    qs = ["what colour is the star ?", "how many shapes are there a digit in ?", "is the red circle left of the blue square ?"]
    return lambda gen: [_Req(q, gen, visual, i, "t", "test") for i, q in enumerate(qs)]


def test_beam_search_counts_each_prompt_once():
    """generate() repeats each prompt num_beams times before the prefill: the figures and each
    answer's prompt length are per prompt (they summed the copies, and every answer got sample 0's)."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", keep=64, batch_size=3)
    reqs = _three(lm)
    greedy = lm.generate_until(reqs({"max_new_tokens": 2}))
    want = lm.summary()
    lm.records.clear()
    beams = lm.generate_until(reqs({"max_new_tokens": 2, "num_beams": 3}))
    assert [o.token_counts.input_tokens for o in beams] == [o.token_counts.input_tokens for o in greedy]
    assert len({o.token_counts.input_tokens for o in greedy}) == 3
    got = lm.summary()
    for key in ("samples", "visual_before", "visual_after", "kept_fraction", "prefill_tflops", "llm_prefill_tflops"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["visual_after"] == 64


def test_prompt_length_of_in_llm_strategies_is_the_mean_over_layers():
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="fastv", ratio=0.25, batch_size=3)
    reqs = _three(lm)
    out = lm.generate_until(reqs({"max_new_tokens": 1}))
    import vtprune

    per_layer = vtprune.stats(lm.model).layer_tokens
    assert per_layer[0] != per_layer[-1]  # fastv drops after layer 1
    assert [o.token_counts.input_tokens for o in out] == [round(sum(ns[b] for ns in per_layer) / len(per_layer))
                                                          for b in range(3)]


def test_decoding_is_greedy_unless_the_temperature_is_positive():
    """As lmms-eval's own models: do_sample without a temperature > 0 decodes greedily (it sampled at T=1)."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="random", ratio=0.5, batch_size=3)
    reqs = _three(lm)
    greedy = [o.text for o in lm.generate_until(reqs({"max_new_tokens": 6}))]
    for gen in ({"do_sample": True, "temperature": 0}, {"do_sample": True}):
        torch.manual_seed(0)
        assert [o.text for o in lm.generate_until(reqs({"max_new_tokens": 6, **gen}))] == greedy, gen
    torch.manual_seed(0)
    sampled = [o.text for o in lm.generate_until(reqs({"max_new_tokens": 6, "do_sample": True, "temperature": 5.0}))]
    assert sampled != greedy  # random weights at T=5: sampling shows


def test_flag_and_count_arguments_are_parsed_not_truthy():
    """random_weights="false" (quoted, as lmms-eval passes it) loaded random weights: bool("false")."""
    from lmms_eval.utils import simple_parse_args_string

    from vtprune.eval import models

    trained = models.load("tiny-llava")[0].state_dict()
    for text in ('random_weights="false"', "random_weights=no", "random_weights=False", "random_weights=0"):
        lm = lmms.Vtprune(**simple_parse_args_string("pretrained=tiny-llava," + text))
        assert all(torch.equal(v, trained[k]) for k, v in lm.model.state_dict().items()), text
    lm = lmms.Vtprune(**simple_parse_args_string('pretrained=tiny-llava,random_weights="true",max_new_tokens="16"'))
    assert not torch.equal(lm.model.state_dict()["lm_head.weight"], trained["lm_head.weight"])
    assert lm.max_new_tokens == 16
    with pytest.raises(ValueError, match="random_weights must be true or false"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights="maybe")
    for text, n in (('"16.0"', 16), ("1e2", 100), ("8", 8)):  # lmms-eval passes some as strings
        assert lmms._count("max_new_tokens", text) == n
    for bad in ("x", 0, 2.5, "none", "2.5", True):
        with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
            lmms.Vtprune(pretrained="tiny-llava", random_weights=True, max_new_tokens=bad)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        lmms.Vtprune(pretrained="tiny-llava", random_weights=True, batch_size=0)


def test_throughput_log_is_per_call_and_leaves_out_padding_requests():
    """lmms-eval averages its throughput log over calls: each call logs its own figures (they were
    cumulative); its padding copies (added to even out ranks) are answered but not counted."""
    from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, reset_logged_metrics

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", keep=64, batch_size=2)
    reqs = _three(lm)
    reset_logged_metrics()
    lm.generate_until(reqs({"max_new_tokens": 1})[:1])
    two = reqs({"max_new_tokens": 1})[1:]
    two[1].metadata = {"__padding_only__": True}
    out = lm.generate_until(two)
    assert all(o is not None and o.text is not None for o in out)
    first, second = get_logged_metrics_history()[-2:]
    assert first["vtprune_samples"] == second["vtprune_samples"] == 1
    assert sum(r["samples"] for r in lm.records) == 2
    # the call's time and tokens are its real batch's (the padding copy's own batch is left out)
    assert second["total_elapsed_time"] == lm.records[1]["generate_s"]
    assert second["total_gen_tokens"] == out[0].token_counts.output_tokens
    lm.generate_until(two[1:])  # padding copies only: no vtprune figures for lmms-eval to average in
    assert not any(k.startswith("vtprune_") for k in get_logged_metrics_history()[-1])
    # sweeps time a prefill on the first real batch's inputs (not the last, nor a padding copy's)
    image = reqs({})[0].args[2]({"scene": 0})
    assert torch.equal(lm.first_inputs["input_ids"], lm._inputs([lm._prompt("what colour is the star ?", 1)], image)["input_ids"])
    # loglikelihood forwards add their figures but no time: lmms-eval's tokens/s is generation's alone
    visual = reqs({})[0].args[2]
    copy = _Req("what colour is the star ?", " red", visual, 0, "t", "test")
    copy.metadata = {"__padding_only__": True}  # answered, not counted, here too
    out = lm.loglikelihood([_Req("what colour is the star ?", " red", visual, 0, "t", "test")] * 2 + [copy])
    third = get_logged_metrics_history()[-1]
    assert third["total_elapsed_time"] == 0 and third["vtprune_samples"] == 2
    assert len(out) == 3 and out[2].text == out[0].text


def test_images_are_loaded_batch_by_batch(monkeypatch):
    """A task's images are decoded when their batch runs (all were held in memory before the first)."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="random", ratio=0.5, batch_size=2)
    loaded, seen = [], []
    lm.task_dict = {"t": {"test": {i: {"scene": i} for i in range(6)}}}

    def visual(d):
        loaded.append(d["scene"])
        return [shapes.render(shapes.sample("eval", d["scene"])[0])]

    generate = lm._generate
    monkeypatch.setattr(lm, "_generate", lambda *a, **k: (seen.append(len(loaded)), generate(*a, **k))[1])
    lm.generate_until([_Req("what colour is the star ?", {"max_new_tokens": 1}, visual, i, "t", "test") for i in range(6)])
    assert seen == [2, 4, 6]


def test_image_placeholders_in_a_simple_prompt():
    """A task prompt's <image> placeholders place its images (LLaVA's processor found two image tokens
    for one image before); a wrong count is removed and the images go first."""
    assert lmms._content("<image>\nwhat is it ?", 1) == [{"type": "image"}, {"type": "text", "text": "what is it ?"}]
    assert lmms._content("first <image> then <image> which ?", 2) == [
        {"type": "text", "text": "first"}, {"type": "image"}, {"type": "text", "text": "then"}, {"type": "image"},
        {"type": "text", "text": "which ?"}]
    assert lmms._content("<image> which ?", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "which ?"}]
    assert lmms._content(" q\n", 1) == [{"type": "image"}, {"type": "text", "text": " q\n"}]  # no placeholder: as given
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="random", ratio=0.5)
    assert lm._prompt("<image>\nwhat colour is the star ?", 1) == lm._prompt("what colour is the star ?", 1)
    lm.processor.chat_template = ("<s> {% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                                  "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")
    prompt = lm._prompt("<image>\nwhat colour is the star ?", 1)
    assert prompt.count("<image>") == 1
    inputs = lm._inputs([prompt], [shapes.render(shapes.sample("eval", 0)[0])])
    assert int((inputs["input_ids"] == lm.model.config.image_token_id).sum()) == 196


def test_chat_class_without_a_template_refuses_turns_it_would_drop():
    lm = lmms.VtpruneChat(pretrained="tiny-llava", random_weights=True, method="random", ratio=0.5)
    image = shapes.render(shapes.sample("eval", 0)[0])
    messages = [{"role": "system", "content": [{"type": "text", "text": "answer in one word"}]},
                {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "what colour ?"}]}]
    lm.task_dict = {"t": {"test": {0: {}}}}
    with pytest.raises(NotImplementedError, match="force_simple"):
        lm.generate_until([_Req("", lambda d: messages, {"max_new_tokens": 1}, 0, "t", "test")])
    out = lm.generate_until([_Req("", lambda d: messages[1:], {"max_new_tokens": 1}, 0, "t", "test")])
    assert out[0].text is not None


# Found by mutating the harness: cases a slip passed (greedy flag, padding side, options, figures)

def test_loglikelihood_greedy_needs_every_token_to_be_greedy():
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)
    scene, qs = shapes.sample("eval", 3)
    lm.task_dict = {"t": {"test": {0: {"scene": 3}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    tok, proc = lm.tokenizer, lm.processor

    def next_word(text):
        inputs = proc(images=[shapes.render(scene)], text=[text], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        with torch.no_grad():
            return tok.convert_ids_to_tokens(int(lm.model(**inputs).logits[0, -1].argmax()))

    base = tinyvlm.prompt("llava", qs[0].text)
    g1 = next_word(base)
    g2 = next_word(base + " " + g1)
    other = next(w for w in shapes.VOCAB if w != g2)
    res = [r.text for r in lm.loglikelihood([_Req(qs[0].text, g1, visual, 0, "t", "test"),
                                             _Req(qs[0].text, f"{g1} {g2}", visual, 0, "t", "test"),
                                             _Req(qs[0].text, f"{g1} {other}", visual, 0, "t", "test")])]
    assert [greedy for _, greedy in res] == [True, True, False]


def _questions(n):
    rows = tinyvlm.held_out("llava", n)
    task = {i: {"scene": idx} for i, (idx, _) in enumerate(shapes.eval_set(n))}
    return rows, task


def test_generated_answers_are_the_bundled_models_answers():
    """The trained tiny-llava through generate_until answers what tinyvlm.answers (the `shapes` scorer)
    answers: the text is the new tokens only, whatever the batch."""
    rows, task = _questions(6)
    model, proc = tinyvlm.load("tiny-llava")
    want = tinyvlm.answers(model, proc, [img for _, img, _ in rows], [q.text for _, _, q in rows])
    lm = lmms.Vtprune(pretrained="tiny-llava", batch_size=3)
    lm.task_dict = {"t": {"test": task}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    out = lm.generate_until([_Req(q.text, {"max_new_tokens": 1}, visual, i, "t", "test") for i, (_, _, q) in enumerate(rows)])
    assert [o.text.split()[0] for o in out] == want


def test_a_checkpoint_that_pads_right_is_read_left_padded(tmp_path):
    model, proc = tinyvlm.load("tiny-llava")
    proc.tokenizer.padding_side = "right"
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    rows, task = _questions(3)
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    qs = ["what colour is the star ?", "how many red shapes are there ?", "is the red circle left of the blue square ?"]
    answers = []
    for batch in (1, 3):
        lm = lmms.Vtprune(pretrained=str(tmp_path), batch_size=batch)
        lm.task_dict = {"t": {"test": task}}
        answers.append([o.text for o in lm.generate_until(
            [_Req(q, {"max_new_tokens": 2}, visual, i, "t", "test") for i, q in enumerate(qs)])])
    assert answers[0] == answers[1]


def test_non_whole_float_for_an_int_option_is_refused():
    from lmms_eval.utils import simple_parse_args_string

    args = simple_parse_args_string("pretrained=tiny-llava,random_weights=true,method=hiprune,keep=8,deep_layer=-2.5")
    with pytest.raises(TypeError, match="deep_layer"):
        lmms.Vtprune(**args)


def test_quoted_flags():
    for v in ('"1"', "'1'", "1", '"yes"', '"true"', 1, True):
        assert lmms._flag("f", v) is True, v
    for v in ('"0"', "0", '"no"', '"false"', 0, False, None):
        assert lmms._flag("f", v) is False, v
    for v in (2, -1, "2", "maybe"):
        with pytest.raises(ValueError, match="f must be true or false"):
            lmms._flag("f", v)


def test_summary_selection_ms_is_per_batch():
    from types import SimpleNamespace

    rec = lambda n, ms: {"samples": n, "visual_before": 196 * n, "visual_after": 49 * n, "selection_ms": ms,  # noqa: E731
                         "generate_s": 1.0, "prefill_tflops": n, "llm_prefill_tflops": n, "vision_tflops": n}
    s = lmms.Vtprune.summary(SimpleNamespace(method="x", options={}, records=[]), [rec(3, 6.0), rec(1, 2.0)])
    assert s["selection_ms"] == 4.0 and s["samples"] == 4 and s["visual_after"] == 49


def test_output_tokens_count_the_eos():
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)
    tok = lm.tokenizer
    word, eos, pad = tok.convert_tokens_to_ids("red"), tok.eos_token_id, tok.pad_token_id
    lm.model.generate = lambda **kw: torch.cat([kw["input_ids"], torch.tensor([[word, eos, pad]])], 1)
    lm.task_dict = {"t": {"test": {0: {"scene": 0}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", 0)[0])]  # noqa: E731
    out = lm.generate_until([_Req("what colour is the star ?", {"max_new_tokens": 3}, visual, 0, "t", "test")])
    assert out[0].text.split() == ["red"] and out[0].token_counts.output_tokens == 2


# Found by mutating the plugin: stop sequences, generation settings, request order, loglikelihood tokens,
# device, figures and dtype that a slip could change without any test failing

def _words_generator(lm, words):
    """A stand-in for generate() that continues every row with `words` (up to max_new_tokens of them),
    recording the settings it is given."""
    ids = lm.tokenizer.convert_tokens_to_ids(words)
    seen = []

    def generate(**kw):
        seen.append({k: kw[k] for k in ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p") if k in kw})
        new = torch.tensor([(ids * kw["max_new_tokens"])[:kw["max_new_tokens"]]] * kw["input_ids"].shape[0])
        return torch.cat([kw["input_ids"], new], 1)

    lm.model.generate = generate
    lm.task_dict = {"t": {"test": {0: {"scene": 0}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", 0)[0])]  # noqa: E731
    return seen, lambda gen: _Req("what colour is the star ?", gen, visual, 0, "t", "test")


def test_stop_sequences_cut_the_answer_before_the_first_one():
    """`until` cuts the decoded answer before the earliest of its stops, whatever their order in the list;
    a task may give one string (one stop, not its characters); an empty stop cuts nothing."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)
    _, req = _words_generator(lm, ["red", "blue", "green", "star"])

    def answer(**until):
        return lm.generate_until([req({"max_new_tokens": 4, **until})])[0].text

    assert answer() == answer(until=[]) == "red blue green star"
    assert answer(until=["green"]) == "red blue "
    assert answer(until=["star", "blue"]) == answer(until=["blue", "star"]) == "red "
    assert answer(until="blue") == "red "  # (as characters, its "e" would cut "red" to "r")
    assert answer(until=["", "sky"]) == "red blue green star"


def test_generation_settings_reach_generate():
    """generate() gets the task's max_new_tokens (the model argument when the task sets none), its num_beams,
    and its temperature and top_p when it samples (greedy otherwise)."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, max_new_tokens=5)
    seen, req = _words_generator(lm, ["red"])
    greedy = {"num_beams": 1, "do_sample": False}
    for gen, want in (({}, {"max_new_tokens": 5, **greedy}),
                      ({"max_new_tokens": 2}, {"max_new_tokens": 2, **greedy}),
                      ({"max_new_tokens": 2, "num_beams": 3}, {"max_new_tokens": 2, "num_beams": 3, "do_sample": False}),
                      ({"max_new_tokens": 2, "temperature": 0, "top_p": 0.9}, {"max_new_tokens": 2, **greedy}),
                      ({"max_new_tokens": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
                       {"max_new_tokens": 2, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9})):
        seen.clear()
        out = lm.generate_until([req(gen)])
        assert seen == [want], gen
        assert out[0].token_counts.output_tokens == want["max_new_tokens"]  # no EOS: every token it was allowed
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)  # the documented default: 64
    seen, req = _words_generator(lm, ["red"])
    lm.generate_until([req({})])
    assert seen == [{"max_new_tokens": 64, **greedy}]


def test_answers_keep_request_order_across_generation_settings():
    """Requests are batched by generation settings: with 1, 3, 1, 3 new tokens interleaved at batch 2 each
    answer comes back at its request's index, generated with its own settings, as when it runs alone."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", keep=64, batch_size=2)
    lm.task_dict = {"t": {"test": {i: {"scene": i} for i in range(4)}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    qs = ["is there a digit ?", "what colour is the star ?", "how many shapes are there a digit in ?",
          "is the red circle left of the blue square ?"]  # prompts of 5, 6, 9 and 10 words: an exchange shows
    reqs = [_Req(q, {"max_new_tokens": 1 + 2 * (i % 2)}, visual, i, "t", "test") for i, q in enumerate(qs)]
    alone = [lm.generate_until([r])[0] for r in reqs]
    together = lm.generate_until(reqs)
    assert [len(lm.tokenizer(o.text, add_special_tokens=False)["input_ids"]) for o in alone] == [1, 3, 1, 3]
    assert [o.token_counts.input_tokens for o in alone] == [1 + 64 + n for n in (5, 6, 9, 10)]
    assert [(o.text, o.token_counts.input_tokens, o.token_counts.output_tokens) for o in together] == \
        [(o.text, o.token_counts.input_tokens, o.token_counts.output_tokens) for o in alone]


def test_loglikelihood_scores_the_continuation_without_special_tokens():
    """A Llama-style tokenizer puts BOS before every text it encodes: the continuation's tokens are its words
    alone (a BOS between the context and the continuation was scored as part of it)."""
    from tokenizers.processors import TemplateProcessing

    import vtprune

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)
    tok = lm.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    red = tok.convert_tokens_to_ids("red")
    assert tok("red")["input_ids"] == [tok.bos_token_id, red]
    loss, inputs = _red_loss_and_inputs(lm, "llava")
    assert int(inputs["input_ids"][0, -1]) == red and int(inputs["input_ids"][0, -2]) != tok.bos_token_id
    vtprune.unpatch(lm.model)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**inputs).logits[0, -2].float(), -1)
    assert loss == pytest.approx(-float(logp[red]), abs=1e-4)



def _sentencepiece_style(tok):
    """`tok` re-made in place as a legacy SentencePiece (Llama) tokenizer: "▁" prepended to every text, spaces
    as "▁", words split before each "▁"; each word's "▁word" keeps the word's id, so a prompt's words have
    the ids they had, and a lone "▁" (the space between two special tokens) reads <unk>."""
    from tokenizers import models, normalizers, pre_tokenizers

    special = set(tok.all_special_tokens)
    vocab = {(w if w in special else "▁" + w): i for w, i in tok.get_vocab().items()}
    vocab["▁"] = tok.unk_token_id
    backend = tok.backend_tokenizer
    backend.model = models.WordLevel(vocab=vocab, unk_token=tok.unk_token)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")


def test_continuation_ids_are_the_tokens_the_continuation_has_after_the_prompt():
    """A multiple-choice continuation " red" alone reads "▁" "▁red" with a SentencePiece-style tokenizer;
    after the prompt it is "▁red". One that glues onto the prompt's last word ("red" after "?") takes its
    own tokens."""
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True)
    tok = lm.tokenizer
    _sentencepiece_style(tok)
    red, unk = tok.get_vocab()["▁red"], tok.unk_token_id
    assert tok(" red", add_special_tokens=False)["input_ids"] == [unk, red]
    assert lmms.continuation_ids(tok, "what colour ?", " red") == [red]
    assert lmms.continuation_ids(tok, "what colour ?", " red blue") == [red, tok.get_vocab()["▁blue"]]
    assert tok("what colour ?red", add_special_tokens=False)["input_ids"][-1] == unk  # "▁?red": one unknown word
    assert lmms.continuation_ids(tok, "what colour ?", "red") == [red]


def test_loglikelihood_scores_the_continuation_as_it_reads_after_the_prompt():
    """With a SentencePiece-style tokenizer, lmms-eval's multiple-choice continuation " red" is scored as
    the one token "▁red" it is inside prompt + " red" (the model's log-probability of that token there), not
    as "▁" "▁red" (the mean over a stray space token and the word)."""
    import vtprune

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", ratio=1.0)
    _sentencepiece_style(lm.tokenizer)
    scene, qs = shapes.sample("eval", 3)
    lm.task_dict = {"t": {"test": {0: {"scene": 3}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", d["scene"])[0])]  # noqa: E731
    (loss, greedy), = (r.text for r in lm.loglikelihood([_Req(qs[0].text, " red", visual, 0, "t", "test")]))
    inputs = lm.processor(images=[shapes.render(scene)], text=[tinyvlm.prompt("llava", qs[0].text) + " red"],
                          return_tensors="pt")
    inputs.pop("token_type_ids", None)
    red = lm.tokenizer.get_vocab()["▁red"]
    assert int(inputs["input_ids"][0, -1]) == red and int(inputs["input_ids"][0, -2]) != lm.tokenizer.unk_token_id
    vtprune.unpatch(lm.model)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**inputs).logits[0, -2].float(), -1)
    assert loss == pytest.approx(-float(logp[red]), abs=1e-4)
    assert greedy == (int(logp.argmax()) == red)

def test_each_process_takes_its_local_gpu(monkeypatch):
    """Under torchrun / accelerate (WORLD_SIZE > 1) a process binds to cuda:LOCAL_RANK, the GPU of its own
    machine (RANK counts the processes of every machine); alone it takes `device` or the default."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert lmms._device(None) == lmms._device("cpu") == torch.device("cuda:3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lmms._device("cpu") == torch.device("cpu") and lmms._device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lmms._device(None) == torch.device("cpu")


def test_summary_figures_are_the_flops_count_per_sample():
    """A batch's TFLOPs in the summary are flops.count's for the same inputs and strategy, divided by its
    samples (vision: the encoder and the projector)."""
    import vtprune
    from vtprune.eval import flops

    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune", keep=64, batch_size=3)
    lm.generate_until(_three(lm)({"max_new_tokens": 1}))
    s = lm.summary()
    vtprune.unpatch(lm.model)
    want = flops.count(lm.model, lm.first_inputs, "divprune", keep=64)
    assert (s["samples"], s["batches"]) == (3, 1)
    assert s["prefill_tflops"] == pytest.approx(want.total_prefill / 3 / 1e12, rel=1e-9)
    assert s["llm_prefill_tflops"] == pytest.approx(want.llm_prefill / 3 / 1e12, rel=1e-9)
    assert s["vision_tflops"] == pytest.approx((want.vision_encoder + want.projector) / 3 / 1e12, rel=1e-9)
    assert want.projector > 0 and want.llm_prefill < flops.count(lm.model, lm.first_inputs).llm_prefill


def test_a_dtype_argument_casts_a_bundled_model_and_its_inputs():
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, dtype="bfloat16", method="divprune", keep=64)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    lm.task_dict = {"t": {"test": {0: {"scene": 0}}}}
    visual = lambda d: [shapes.render(shapes.sample("eval", 0)[0])]  # noqa: E731
    out = lm.generate_until([_Req("what colour is the star ?", {"max_new_tokens": 2}, visual, 0, "t", "test")])
    assert out[0].text is not None and lm.summary()["visual_after"] == 64


# videos ----------------------------------------------------------------------------------------

VIDEO_TASK = "vtprune_shapes_video"


def _clip(path, frames=10, h=30, w=42, fps=2.0, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    return video, clips.write(video, path, fps=fps)


def test_clips_sample_uniformly_and_read_back_the_pixels_written(tmp_path):
    video, path = _clip(tmp_path / "a.avi")
    # evenly spaced from the first frame to the last, rounded: linspace(0, 9, 4) = 0, 3, 6, 9
    for max_frames, multiple, want in ((32, 1, list(range(10))), (4, 1, [0, 3, 6, 9]), (5, 2, [0, 3, 6, 9]),
                                       (3, 2, [0, 9]), (1, 1, [0]), (3, 1, [0, 4, 9])):
        frames, meta = clips.read(path, max_frames, multiple)
        assert meta.frames_indices == want, (max_frames, multiple)
        assert np.array_equal(frames, video[want])  # lossless
        assert (meta.total_num_frames, meta.fps, meta.duration, meta.height, meta.width) == (10, 2.0, 5.0, 30, 42)
    # a segment in seconds: frames 2 (1.0 s) to 7 (3.5 s) at 2 fps, six of them; the metadata describes the
    # segment (what Qwen2.5-VL's time steps read: sampled_fps = 6 of its 6 frames at 2 fps)
    meta = clips.read(path, 8, 2, start=1.0, end=3.5)[1]
    assert meta.frames_indices == [2, 3, 4, 5, 6, 7]
    assert (meta.total_num_frames, meta.duration, meta.sampled_fps) == (6, 3.0, 2.0)
    assert clips.read(path, 2, 1, start=1.0, end=3.5)[1].frames_indices == [2, 7]
    assert clips.read(path, 8, 1, start=4.0)[1].frames_indices == [8, 9]
    # one frame, for a model whose temporal patch is 2: that frame (the processor repeats it)
    one = clips.write(video[:1], tmp_path / "one.avi")
    assert clips.read(one, 8, 2)[1].frames_indices == [0]
    # a container whose header has no frame count (Matroska): counted from its packets, same frames
    import av

    mkv = tmp_path / "a.mkv"
    with av.open(str(path)) as src, av.open(str(mkv), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0
    frames, meta = clips.read(mkv, 4, 1)
    assert meta.frames_indices == [0, 3, 6, 9] and np.array_equal(frames, video[[0, 3, 6, 9]])
    # by rate: floor(seconds x rate) frames, a multiple of the temporal patch, at most max_frames
    assert clips.read(path, 32, 1, rate=1.0)[1].frames_indices == [0, 2, 4, 7, 9]  # 5 s -> 5 frames (4.5 -> 4: half to even)
    assert clips.read(path, 32, 2, rate=1.0)[1].frames_indices == [0, 3, 6, 9]  # -> 4
    assert clips.read(path, 3, 1, rate=1.0)[1].frames_indices == [0, 4, 9]  # capped
    assert clips.read(path, 32, 2, rate=0.1)[1].frames_indices == [0, 3, 6, 9]  # at least 4 (qwen-vl-utils)
    assert clips.read(path, 32, 1, start=1.0, end=3.5, rate=1.0)[1].frames_indices == [2, 4, 5, 7]  # 3 s, 4 at least
    assert clips.read(path, 32, 1, start=1.0, end=4.5, rate=2.0)[1].frames_indices == [2, 3, 4, 5, 6, 7, 8, 9]  # 8
    assert clips.read(path, 1, 2)[1].frames_indices == [0, 9]  # never less than one temporal patch
    # segment edges between frame times take the frames inside: frame 2 (1.0 s) is before 1.2 s, frame 8
    # (4.0 s) after 3.7 s; and a rate gives floor(seconds x rate) frames: 5 s x 1.5 = 7.5 -> 7
    assert clips.read(path, 32, 1, start=1.2)[1].frames_indices == [3, 4, 5, 6, 7, 8, 9]
    assert clips.read(path, 32, 1, end=3.7)[1].frames_indices == list(range(8))
    assert len(clips.read(path, 32, 1, rate=1.5)[1].frames_indices) == 7
    with pytest.raises(ValueError, match="rate"):
        clips.read(path, 4, rate=0)
    with pytest.raises(ValueError, match="no frames in the segment"):
        clips.read(path, 4, start=6.0)
    with pytest.raises(ValueError, match="max_frames"):
        clips.read(path, 0)


def test_clips_by_rate_take_at_least_four_frames_in_whole_patches(tmp_path):
    """qwen-vl-utils' floor: 4 frames rounded up to whole temporal patches (6 for a patch of 3, not 3)."""
    video, path = _clip(tmp_path / "a.avi")
    # linspace(0, 9, 6) = 0, 1.8, 3.6, 5.4, 7.2, 9
    assert clips.read(path, 32, 3, rate=0.1)[1].frames_indices == [0, 2, 4, 5, 7, 9]


def test_clips_a_segment_ending_after_the_clip_ends_with_its_last_frame(tmp_path):
    video, path = _clip(tmp_path / "a.avi")  # 10 frames at 2 fps: frame 9 at 4.5 s
    frames, meta = clips.read(path, 32, 1, start=4.0, end=10.0)
    assert meta.frames_indices == [8, 9] and np.array_equal(frames, video[[8, 9]])


def test_clips_cut_short_are_sampled_over_the_frames_that_decode(tmp_path):
    """A file cut after its 6th frame still says 10 frames in its header: the frames are sampled again over
    the 6 that decode (linspace(0, 5, 4) = 0, 1.67, 3.33, 5), not refused."""
    import av

    video, path = _clip(tmp_path / "a.avi")
    with av.open(str(path)) as c:
        starts = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[:starts[6]])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 10
    frames, meta = clips.read(cut, 4, 1)
    assert meta.frames_indices == [0, 2, 3, 5] and np.array_equal(frames, video[[0, 2, 3, 5]])
    assert (meta.total_num_frames, meta.duration) == (6, 3.0)


def _direct_answers(model, proc, docs, frames):
    """The model's argmax next token after each doc's question on its scene held still for `frames`
    frames, from the processor directly (the `shapes` scorer's way, with a video prompt)."""
    from vtprune.eval.models import to_model

    tasks_utils = _utils()
    out = []
    for doc in docs:
        still = np.asarray(tasks_utils.doc_to_visual_dynres(doc)[0].convert("RGB"))
        inputs = proc(videos=[np.stack([still] * frames)], text=[tinyvlm.prompt("qwen2_vl", doc["question"], video=True)],
                      return_tensors="pt", do_sample_frames=False)
        inputs.pop("token_type_ids", None)
        with torch.no_grad():
            logits = model(**to_model(dict(inputs), model), logits_to_keep=1).logits[:, -1]
        out.append(proc.tokenizer.convert_ids_to_tokens(int(logits.argmax())))
    return out


def _utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location("shapes_task_utils", lmms.TASKS / "vtprune_shapes" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _video_docs(n):
    import json

    lines = (lmms.TASKS / "vtprune_shapes" / "shapes_eval.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_video_task_answers_are_the_models_answers_on_its_frames(tasks):
    """The trained tiny-qwen2vl through lmms-eval on vtprune_shapes_video answers what it answers on the
    same still frames given to its processor directly; each clip's 8 frames are 4 temporal patches."""
    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", batch_size=3, max_frames_num=8)
    res, answers = evaluate(lm, tasks, 6, VIDEO_TASK)
    docs = _video_docs(6)
    assert [a.split()[0] for a in answers] == _direct_answers(lm.model, lm.processor, docs, 8)
    per_clip = [4 * (d["width"] // 28) * (d["height"] // 28) for d in docs]
    assert lm.summary()["visual_before"] == pytest.approx(sum(per_clip) / 6)
    assert res["results"][VIDEO_TASK]["accuracy,none"] == pytest.approx(
        np.mean([a.split()[0] == d["answer"] for a, d in zip(answers, docs)]))
    # max_frames_num caps the frames read, in whole temporal patches: 5 -> 4 of the 8 (2 patches), half the tokens
    half = lmms.Vtprune(pretrained="tiny-qwen2vl", batch_size=3, max_frames_num=5)
    evaluate(half, tasks, 6, VIDEO_TASK)
    assert half.summary()["visual_before"] == pytest.approx(sum(per_clip) / 12)
    # or by rate: fps=1 reads 4 frames of the 4-second clips
    rated = lmms.Vtprune(pretrained="tiny-qwen2vl", batch_size=3, fps="1")
    evaluate(rated, tasks, 6, VIDEO_TASK)
    assert rated.summary()["visual_before"] == pytest.approx(sum(per_clip) / 12)
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, fps=0)


def test_video_answers_do_not_depend_on_batch_or_protocol(tasks):
    kw = dict(pretrained="tiny-qwen2vl", method="divprune", ratio=0.25, max_frames_num=8)
    one = lmms.Vtprune(batch_size=1, **kw)
    answers = evaluate(one, tasks, 6, VIDEO_TASK)[1]
    for cls in (lmms.Vtprune, lmms.VtpruneChat):
        assert evaluate(cls(batch_size=3, **kw), tasks, 6, VIDEO_TASK)[1] == answers, cls.__name__
    s = one.summary()
    assert s["kept_fraction"] == pytest.approx(0.25, abs=0.02) and s["llm_prefill_tflops"] > 0


def test_loglikelihood_reads_a_video(tmp_path):
    """A multiple-choice request on a clip: keep-all gives the unpatched model's log-probability of the
    continuation on the same frames given to the processor directly."""
    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", method="divprune", ratio=1.0, max_frames_num=4)
    video, path = _clip(tmp_path / "c.avi", frames=6, h=168, w=196)
    lm.task_dict = {"t": {"test": {0: {}}}}
    (loss, _), = (r.text for r in lm.loglikelihood([_Req("what colour is the star ?", "red", lambda d: [str(path)], 0,
                                                         "t", "test")]))
    inputs = lm.processor(videos=[video[[0, 2, 3, 5]]], text=[tinyvlm.prompt("qwen2_vl", "what colour is the star ? red",
                                                                              video=True)],
                          return_tensors="pt", do_sample_frames=False)
    inputs.pop("token_type_ids", None)
    import vtprune

    vtprune.unpatch(lm.model)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(**inputs).logits[0, -2].float(), -1)
    assert loss == pytest.approx(-float(logp[inputs["input_ids"][0, -1]]), abs=1e-4)
    assert lm.summary()["visual_before"] == 2 * (168 // 28) * (196 // 28)


def test_a_model_without_video_input_refuses_a_video_task(tasks):
    lm = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="random", ratio=0.5)
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration takes no video"):
        evaluate(lm, tasks, 2, VIDEO_TASK)
    lm.task_dict = {"t": {"test": {0: {}}}}
    with pytest.raises(NotImplementedError, match="not audio"):
        lm.generate_until([_Req("q", {"max_new_tokens": 1}, lambda d: ["x.wav"], 0, "t", "test")])
    with pytest.raises(ValueError, match="max_frames_num must be a whole number >= 1, got 0"):
        lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, max_frames_num=0)


# local checkpoints of the video families: a word-level tokenizer over the test models' ids

VIDEO_TEMPLATE = ("{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'video' %}VIDEO "
                  "{% elif c['type'] == 'image' %}IMAGE {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def _tokenizer(image, video, extra=()):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": tiny.PAD, "<s>": tiny.BOS, "</s>": tiny.EOS, "<unk>": 3, "what": 4, "is": 5, "it": 6, "?": 7,
             image: tiny.IMG, video: tiny.VID, "<|vision_start|>": tiny.VSTART, "<|vision_end|>": tiny.VEND}
    vocab.update({w: 10 + i for i, w in enumerate(extra)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left",
        extra_special_tokens={"image_token": image, "video_token": video, "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"})


def _processor(family):
    import transformers as tf

    if family == "llava_next_video":
        tok = _tokenizer("<image>", "<video>")
        size = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return tf.LlavaNextVideoProcessor(
            video_processor=tf.LlavaNextVideoVideoProcessor(**size),
            image_processor=tf.LlavaNextImageProcessor(image_grid_pinpoints=tiny.NEXT_PINPOINTS, **size), tokenizer=tok,
            patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=VIDEO_TEMPLATE.replace("VIDEO", "<video>").replace("IMAGE", "<image>"))
    patch = 14 if family == "qwen2_5_vl" else 16
    size = dict(size={"shortest_edge": 16 * 16 * 4, "longest_edge": 64 * 64}, patch_size=patch, merge_size=2,
                temporal_patch_size=2)
    tok = _tokenizer("<|image_pad|>", "<|video_pad|>", extra=["<0.8", "<3.8", "seconds>"])
    template = VIDEO_TEMPLATE.replace("VIDEO", "<|vision_start|> <|video_pad|> <|vision_end|>").replace(
        "IMAGE", "<|vision_start|> <|image_pad|> <|vision_end|>")
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**size), tokenizer=tok,
                                      video_processor=tf.Qwen2VLVideoProcessor(**size), chat_template=template)
    video = dict(size, size={"shortest_edge": 16 * 16 * 4, "longest_edge": 4 * 64 * 64})  # Qwen3-VL: pixels of all frames
    return tf.Qwen3VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**size), tokenizer=tok,
                               video_processor=tf.Qwen3VLVideoProcessor(**video), chat_template=template)


@pytest.mark.parametrize("family,tokens", [("llava_next_video", 4 * 4), ("qwen2_5_vl", 2 * 4), ("qwen3_vl", 2 * 4)])
def test_local_checkpoints_of_video_models_read_clips(tmp_path, family, tokens):
    """A saved LLaVA-NeXT-Video / Qwen2.5-VL / Qwen3-VL checkpoint with its processor runs a video request
    through the chat template: 4 of a 10-frame 2-fps clip's frames ([0, 3, 6, 9]) reach the processor
    with their metadata (Qwen2.5-VL: 2 frames a temporal patch at 0.8 sampled fps = 2.5 s; Qwen3-VL:
    the patches' mean timestamps 0.75 s and 3.75 s written in the prompt, as "<0.8" and "<3.8"), and are
    pruned."""
    model, proc = tiny.build(family), _processor(family)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    _, path = _clip(tmp_path / "clip.avi", h=56, w=56)
    seen = {}
    for method in (None, "divprune"):
        lm = lmms.VtpruneChat(pretrained=str(tmp_path / "ckpt"), method=method, max_frames_num=4,
                              **({"ratio": 0.5} if method else {}))
        lm.task_dict = {"t": {"test": {0: {}}}}
        messages = [{"role": "user", "content": [{"type": "video", "url": str(path)},
                                                 {"type": "text", "text": "what is it ?"}]}]
        inputs = {}
        generate = lm._generate
        lm._generate = lambda *a, **k: (inputs.update(lm._inputs(a[0], a[1], k["videos"])), generate(*a, **k))[1]
        out = lm.generate_until([_Req("", lambda d: messages, {"max_new_tokens": 2}, 0, "t", "test")])
        assert out[0].text is not None
        assert int((inputs["input_ids"] == tiny.VID).sum()) == tokens
        s = lm.summary()
        assert s["visual_before"] == tokens and s["visual_after"] == (tokens if method is None else tokens // 2)
        seen[method] = inputs
    inputs = seen[None]
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [2.5]
    if family == "qwen3_vl":
        words = lm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        assert [w for w in words if w.startswith("<") and w[1:2].isdigit()] == ["<0.8", "<3.8"]
        assert words.count("seconds>") == 2
    if family == "llava_next_video":
        assert inputs["pixel_values_videos"].shape[:2] == (1, 4)


def test_llava_video_batches_split_where_clips_read_different_frame_counts(tmp_path):
    """LLaVA-NeXT-Video's processor stacks a batch's clips into one tensor: a 10-frame clip (4 frames
    read) beside a 3-frame one (3 read) runs as two sub-batches, with batch 1's answers and figures."""
    model, proc = tiny.build("llava_next_video"), _processor("llava_next_video")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    paths = [_clip(tmp_path / "a.avi", frames=10, h=56, w=56)[1], _clip(tmp_path / "b.avi", frames=3, h=56, w=56, seed=1)[1],
             _clip(tmp_path / "c.avi", frames=8, h=56, w=56, seed=2)[1]]
    answers, figures = [], []
    for batch in (1, 3):
        lm = lmms.Vtprune(pretrained=str(tmp_path / "ckpt"), method="divprune", ratio=0.5, max_frames_num=4,
                          batch_size=batch)
        lm.task_dict = {"t": {"test": {i: {} for i in range(3)}}}
        out = lm.generate_until([_Req("what is it ?", {"max_new_tokens": 3}, lambda d, p=p: [str(p)], i, "t", "test")
                                 for i, p in enumerate(paths)])
        answers.append([o.text for o in out])
        figures.append((lm.summary()["visual_before"], lm.summary()["visual_after"]))
    assert answers[0] == answers[1]
    assert figures[0] == figures[1] == ((16 + 12 + 16) / 3, (8 + 6 + 8) / 3)  # 4 tokens a frame, half kept


def test_video_sources_as_lmms_eval_gives_them(tmp_path):
    """A .webm is a video in both protocols (lmms-eval's chat messages file it under audio); a typed dict
    follows its type; a dict without a file says what it needs."""
    from lmms_eval.protocol import ChatMessages

    chat = ChatMessages(messages=[{"role": "user", "content": [{"type": "audio", "url": "clip.webm"},
                                                               {"type": "audio", "url": "talk.wav"},
                                                               {"type": "text", "text": "what is it ?"}]}])
    images, videos, audios = lmms._webm_as_video(chat).extract_media()
    assert (images, videos, audios) == ([], ["clip.webm"], ["talk.wav"])
    assert lmms._media(["clip.webm"])[1] == ["clip.webm"]
    shapes.render(shapes.sample("eval", 0)[0]).save(tmp_path / "x.png")
    images, videos = lmms._media([{"type": "image", "path": str(tmp_path / "x.png")}, {"path": "v.mp4"}])
    assert len(images) == 1 and videos == [{"path": "v.mp4"}]
    shapes.render(shapes.sample("eval", 0)[0]).save(tmp_path / "X.PNG", format="PNG")  # extensions in any case
    assert [len(x) for x in lmms._media([str(tmp_path / "X.PNG"), "V.MP4"])] == [1, 1]
    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True)
    with pytest.raises(ValueError, match="needs its file under 'url', 'path' or 'video'"):
        lm._video({"video_start": 1.0})
    video, path = _clip(tmp_path / "a.avi")
    for key in ("url", "path", "video"):
        frames, meta = lm._video({key: str(path)})
        assert meta.frames_indices == list(range(10)) and np.array_equal(frames, video), key
    with pytest.raises(NotImplementedError, match="not audio"):
        lmms._media([{"type": "audio", "path": "talk.wav"}])


def test_a_video_segment_is_read_in_both_protocols(tmp_path):
    """A dict's video_start / video_end (the simple protocol) and a chat message's start_time / end_time read
    that segment: frames 2..7 (1.0 s to 3.5 s) of a 10-frame 2-fps clip."""
    video, path = _clip(tmp_path / "a.avi")
    lm = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, max_frames_num=8)
    frames, meta = lm._video({"path": str(path), "video_start": 1.0, "video_end": 3.5})
    assert meta.frames_indices == [2, 3, 4, 5, 6, 7] and np.array_equal(frames, video[2:8])
    chat = lmms.VtpruneChat(pretrained="tiny-qwen2vl", random_weights=True, max_frames_num=8)
    chat.task_dict = {"t": {"test": {0: {}}}}
    messages = [{"role": "user", "content": [{"type": "video", "url": str(path), "start_time": 1.0, "end_time": 3.5},
                                             {"type": "text", "text": "what is it ?"}]}]
    _, images, videos = chat._request(("", lambda d: messages, {}, 0, "t", "test"))
    assert images == [] and [m.frames_indices for _, m in videos] == [[2, 3, 4, 5, 6, 7]]
    for start, end, want in ((1.0, None, list(range(2, 10))), (None, 3.5, list(range(8)))):  # one edge given
        messages[0]["content"][0].update(start_time=start, end_time=end)
        _, _, videos = chat._request(("", lambda d: messages, {}, 0, "t", "test"))
        assert [m.frames_indices for _, m in videos] == [want], (start, end)


def test_simple_prompt_puts_videos_first():
    assert lmms._content("what is it ?", 0, 1) == [{"type": "video"}, {"type": "text", "text": "what is it ?"}]
    assert lmms._content("what is it ?", 1, 1) == [{"type": "video"}, {"type": "image"},  # (no placeholder)
                                                   {"type": "text", "text": "what is it ?"}]
    assert lmms._content("<image> and this ?", 1, 1) == [{"type": "video"}, {"type": "image"},
                                                         {"type": "text", "text": "and this ?"}]
    images, videos = lmms._media(["a.mp4", {"path": "b.avi", "video_start": 1.0}, shapes.render(shapes.sample("eval", 0)[0])])
    assert videos == ["a.mp4", {"path": "b.avi", "video_start": 1.0}] and len(images) == 1


def test_min_and_max_pixels_set_the_qwen_image_range():
    """`max_pixels` / `min_pixels`, as lmms-eval's Qwen models take them. A 448x336 image is 16x22 patches of
    14 px by default (a 78,400-pixel cap); at most 40,000 pixels it is scaled by sqrt(150528 / 40000) and
    floored to multiples of 28: 168x224, 12x16 patches, so 48 tokens after the 2x2 merge reach the model.
    A 56x56 image at least 112x112 is 8x8. Values come as lmms-eval passes them (ints or text). Videos
    keep their processor's range."""
    from PIL import Image

    wide, small = Image.new("RGB", (448, 336)), Image.new("RGB", (56, 56))
    prompt = "<|vision_start|> <|image_pad|> <|vision_end|> what colour is the star ?"

    def grid(lm, image):
        return lm._inputs([prompt], [image])["image_grid_thw"].tolist()

    base = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True)
    assert grid(base, wide) == [[1, 16, 22]]
    capped = lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, method="random", keep=4, max_pixels="40000")
    assert grid(capped, wide) == [[1, 12, 16]]
    video = capped.processor.video_processor.size
    assert (video.shortest_edge, video.longest_edge) == (base.processor.video_processor.size.shortest_edge,
                                                         base.processor.video_processor.size.longest_edge)
    capped.task_dict = {"t": {"test": {0: {}}}}
    capped.generate_until([_Req("what colour is the star ?", {"max_new_tokens": 2}, lambda d: [wide], 0, "t", "test")])
    assert (capped.records[-1]["visual_before"], capped.records[-1]["visual_after"]) == (48, 4)
    assert grid(lmms.Vtprune(pretrained="tiny-qwen2vl", random_weights=True, min_pixels=112 * 112), small) == [[1, 8, 8]]
    assert grid(base, small) != [[1, 8, 8]]


@pytest.mark.parametrize("kwargs, words", [
    (dict(pretrained="tiny-llava", max_pixels=12544), "Qwen-VL's dynamic-resolution images; CLIPImageProcessor"),
    (dict(pretrained="tiny-qwen2vl", min_pixels=200 * 200, max_pixels=100 * 100),
     r"min_pixels \(40000\) must not exceed max_pixels \(10000\); set both"),
    (dict(pretrained="tiny-qwen2vl", max_pixels=100 * 100),  # the tiny processor's own min_pixels is 168 x 168
     r"min_pixels \(28224, the checkpoint's\) must not exceed max_pixels \(10000\)"),
    (dict(pretrained="tiny-qwen2vl", max_pixels=0), "max_pixels must be a whole number >= 1, got 0"),
    (dict(pretrained="tiny-qwen2vl", min_pixels="1e9x"), "min_pixels must be a whole number"),
])
def test_bad_pixel_ranges_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        lmms.Vtprune(random_weights=True, **kwargs)


def test_vflowopt_reads_the_processors_pixel_normalisation_unless_given(siglip_normalised, tmp_path):
    """The entropy term undoes the processor's normalisation; its default is CLIP's, so a checkpoint normalising by
    0.5 / 0.5 (LLaVA-OneVision's SigLIP ones, Qwen3-VL) read wrong grey levels unless told. The plugin has the
    processor: its values are passed, unless pixel_mean / pixel_std are given as options or in a config file."""
    from vtprune.methods.vflowopt import VFlowOptConfig

    config = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="vflowopt", keep=8,
                          alpha=0.5).model._vtprune.method.config
    assert (config.pixel_mean, config.pixel_std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    given = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="vflowopt", keep=8,
                         pixel_mean=[0.25, 0.25, 0.25]).model._vtprune.method.config
    assert given.pixel_mean == (0.25, 0.25, 0.25) and given.pixel_std == VFlowOptConfig(keep=1).pixel_std
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"method": "vflowopt", "options": {"ratio": 0.25, "pixel_std": [0.2, 0.2, 0.2]}}))
    filed = lmms.Vtprune(pretrained="tiny-llava", random_weights=True, config=str(path)).model._vtprune.method.config
    assert filed.pixel_std == (0.2, 0.2, 0.2) and filed.pixel_mean == VFlowOptConfig(keep=1).pixel_mean
    assert not hasattr(lmms.Vtprune(pretrained="tiny-llava", random_weights=True, method="divprune",
                                    keep=8).model._vtprune.method.config, "pixel_mean")
