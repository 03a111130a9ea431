"""Why a tiny VLM answers what it answers: three probes of a model saved by train_tiny.py.

  python scripts/diagnose_tiny.py --model vtprune/bundled/tiny-llava [--json out.json]

- readout: the visual tokens read through the (tied) LM head, per key (colour, shape, digit): how often
  the best of that key's words is the one under the token (train_tiny.readout). Stage B can only bind a
  question's words to tokens that name them.
- attention: on colour questions, the attention mass (mean over heads) that the "?" position (where the
  answer is predicted) puts on the tokens of the object the question names, and on the image, per layer.
- colour errors: held-out colour questions split into right / a colour of another object in the scene /
  a colour not in the scene ("another object" means the model looks at the image but not at the object).
- relation: on relation questions ("is the red circle left of the blue star ?"), the answer accuracy, the
  attention mass each shape word puts on its own object per layer, and, per hidden state, linear probes
  (fit on 70 % of the questions, scored on the rest) of what the answer is decided by: at the "?", the
  relation asked, the first and the second object's grid cell, the answer; at the shape words, their
  object's cell. A step that nothing reads (tiny-qwen2vl's "?" never read its relation word) shows here.
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402

from vtprune.eval import tinyvlm  # noqa: E402

FIRST_SCENE = 5_000_000  # training-split scenes far beyond any training run's (the shipped ones end below 1.5 M)


def readout(model, family, proc, n_scenes):
    batch = train_tiny.scenes(family, FIRST_SCENE, n_scenes)
    inputs = proc.image_processor([img for _, img, _ in batch], return_tensors="pt")
    feats = train_tiny.visual_tokens(model, family, inputs)
    emb = model.model.multi_modal_projector(feats) if family == "llava" else feats
    logits = model.lm_head(emb.reshape(-1, emb.shape[-1])).float()
    return train_tiny.readout(logits, proc, train_tiny.token_labels(family, batch))


def attention(model, family, proc, n_scenes):
    model.set_attn_implementation("eager")
    batch = train_tiny.scenes(family, FIRST_SCENE, n_scenes, only={"colour"})
    inputs, _, asked = train_tiny.qa_batch(family, proc, batch, random.Random(0), 1)
    out = model(**inputs, output_attentions=True)
    targets = train_tiny.attention_targets(family, proc, batch, inputs, asked)
    b = torch.tensor([t[0] for t in targets])
    pos = torch.tensor([t[1] for t in targets])
    named = torch.stack([t[2] for t in targets])
    image = (inputs["input_ids"] == model.config.image_token_id).float()[b]
    rows = []
    for layer, a in enumerate(out.attentions):
        at = a[b, :, pos].float()  # [questions, heads, keys]
        rows.append({"layer": layer, "on_named_object": round((at * named[:, None]).sum(-1).mean().item(), 4),
                     "on_image": round((at * image[:, None]).sum(-1).mean().item(), 4)})
    return {"named_share_of_image_tokens": round((named.sum(1) / image.sum(1)).mean().item(), 4), "layers": rows}


def colour_errors(model, family, proc, n_questions):
    rows = [r for r in tinyvlm.held_out(family, n_questions) if r[2].kind == "colour"]
    got = tinyvlm.answers(model, proc, [img for _, img, _ in rows], [q.text for _, _, q in rows])
    count = Counter()
    for (scene, _, q), answer in zip(rows, got):
        present = {o.colour for o in scene.objects}
        count["right" if answer == q.answer else "another_object" if answer in present else "not_in_scene"] += 1
    return dict(count)


def linear_probe(x, y, classes, fit=0.7, steps=300):
    """Held-out accuracy of a linear read-out of `classes` classes from x [n, d], fit (standardised, Adam, a
    small L2 penalty) on the first `fit` share of the rows and scored on the rest."""
    n = int(len(y) * fit)
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-5
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            (F.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * (w ** 2).sum()).backward()
            opt.step()
    return round(float(((x[n:] @ w + b).argmax(-1) == y[n:]).float().mean()), 4)


def relation(model, family, proc, n_questions):
    model.set_attn_implementation("eager")
    qmark = proc.tokenizer.convert_tokens_to_ids("?")
    right, mass, states, labels = [], [], [], []
    for start in range(0, n_questions, 32):
        batch = train_tiny.scenes(family, FIRST_SCENE + start, min(32, n_questions - start), only={"relation"})
        inputs, targets, asked = train_tiny.qa_batch(family, proc, batch, random.Random(start), 1)
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        pred = out.logits[:, :-1].argmax(-1)
        words = [t for t in train_tiny.attention_targets(family, proc, batch, inputs, asked, "word") if len(t) == 4]
        for b, word, target, _ in words:  # each shape word -> its object's tokens
            mass.append([float((a[b, :, word] * target).sum(-1).mean()) for a in out.attentions])
        for b, (q,) in enumerate(asked):
            pos = int((inputs["input_ids"][b] == qmark).nonzero()[0])
            first, second = train_tiny.naming_words(proc, inputs["input_ids"][b], pos, q)
            right.append(bool(pred[b, pos] == targets[b, pos + 1]))
            states.append(torch.stack([h[b, [pos, first, second]] for h in out.hidden_states]))  # [states, 3, d]
            cells = [3 * o.cell[0] + o.cell[1] for o in (batch[b][0].objects[r - 1] for r in q.refs)]
            labels.append([train_tiny.relation_asked(q), *cells, q.answer])
    states = torch.stack(states)  # [questions, hidden states, 3, d]
    rel = torch.tensor([r[0] for r in labels])
    first, second = torch.tensor([r[1] for r in labels]), torch.tensor([r[2] for r in labels])
    answer = torch.tensor([r[3] == "yes" for r in labels]).long()
    probes = [{"hidden_state": k,
               "at_answer": {"relation": linear_probe(states[:, k, 0], rel, len(train_tiny.shapes.RELATIONS)),
                             "first_cell": linear_probe(states[:, k, 0], first, 9),
                             "second_cell": linear_probe(states[:, k, 0], second, 9),
                             "answer": linear_probe(states[:, k, 0], answer, 2)},
               "at_shape_words": {"cell": linear_probe(torch.cat([states[:, k, 1], states[:, k, 2]]),
                                                      torch.cat([first, second]), 9)}}
              for k in range(states.shape[1])]
    mass = torch.tensor(mass).mean(0)
    return {"questions": len(right), "accuracy": round(sum(right) / len(right), 4),
            "shape_word_on_its_object": [round(float(m), 4) for m in mass], "probes": probes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True,
                    help="a directory saved by train_tiny.py, or a bundled name (tiny-llava, tiny-qwen2vl)")
    ap.add_argument("--scenes", type=train_tiny.at_least(1), default=32, help="scenes for the readout and attention probes")
    ap.add_argument("--questions", type=train_tiny.at_least(1), default=600, help="held-out questions (their colour ones are used)")
    ap.add_argument("--relation-questions", type=train_tiny.at_least(1), default=320,
                    help="relation questions (training-split scenes no run has used) for the relation probes")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import transformers as tf

    path = tinyvlm.BUNDLED / args.model if args.model in tinyvlm.NAMES else Path(args.model)
    if not path.is_dir():
        ap.error(f"--model {args.model}: not a directory, nor a bundled name ({', '.join(tinyvlm.NAMES)})")
    model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    family = tinyvlm.family_of(model)
    proc = tinyvlm.processor(family)
    with torch.no_grad():
        errors = colour_errors(model, family, proc, args.questions)
        read = readout(model, family, proc, args.scenes)
        attn = attention(model, family, proc, args.scenes)  # last two: they switch the model to eager attention
        rel = relation(model, family, proc, args.relation_questions)
    result = {"model": args.model, "family": family, "colour_errors": errors,
              "readout": {k: round(v, 4) for k, v in read.items()}, "attention": attn, "relation": rel}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
