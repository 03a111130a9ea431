"""Why a tiny VLM answers what it answers: three probes of a model saved by train_tiny.py.

  python scripts/diagnose_tiny.py --model vtprune/bundled/tiny-llava [--json out.json]

- readout: the visual tokens read through the (tied) LM head, per key (colour, shape, digit): how often
  the best of that key's words is the one under the token (train_tiny.readout). Stage B can only bind a
  question's words to tokens that name them.
- attention: on colour questions, the attention mass (mean over heads) that the "?" position (where the
  answer is predicted) puts on the tokens of the object the question names, and on the image, per layer.
- colour errors: held-out colour questions split into right / a colour of another object in the scene /
  a colour not in the scene ("another object" means the model looks at the image but not at the object).
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402

from vtprune.eval import tinyvlm  # noqa: E402

FIRST_SCENE = 900_000  # training-split scenes far beyond any training run's


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a directory saved by train_tiny.py (or a bundled model's)")
    ap.add_argument("--scenes", type=int, default=32, help="scenes for the readout and attention probes")
    ap.add_argument("--questions", type=int, default=600, help="held-out questions (their colour ones are used)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import transformers as tf

    model = tf.AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    family = tinyvlm.family_of(model)
    proc = tinyvlm.processor(family)
    with torch.no_grad():
        errors = colour_errors(model, family, proc, args.questions)
        read = readout(model, family, proc, args.scenes)
        attn = attention(model, family, proc, args.scenes)  # last: it switches the model to eager attention
    result = {"model": args.model, "family": family, "colour_errors": errors,
              "readout": {k: round(v, 4) for k, v in read.items()}, "attention": attn}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
