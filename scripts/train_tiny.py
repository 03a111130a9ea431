"""Train a bundled tiny VLM on the synthetic `shapes` benchmark (reproducible by seed, step counts and --threads).

  python scripts/train_tiny.py --family llava --out vtprune/bundled/tiny-llava
  python scripts/train_tiny.py --family qwen2_vl --out vtprune/bundled/tiny-qwen2vl

Stage A pretrains the vision tower on per-token labels the generator knows for free (colour, shape
and digit under each LLM-side token), as LLaVA starts from a pretrained CLIP: a language model
trained end to end from scratch never learns to look at the image. Stage P aligns the projector so
that visual tokens read, through the LM head, as the words naming them. Stage B freezes the tower and
trains the projector and language model on questions (several question/answer pairs per image,
loss on the answers), with the answer position's attention supervised toward the visual tokens of
the items the question refers to (--attn-sup) and optionally one question kind at a time
(--curriculum), and optionally its attention to background visual tokens damped until the questions
are learnt (--background-bias). --attn-targets word routes count and relation questions through the
words that name their objects (those words look at the objects, the last layer's answer position reads
the words) and --aux-probe asks the words' states to hold each object's grid cell and the count, the
answer position's both cells, and each query, where it forms, what it looks for (the asked cell, colour
or shape); --relation-query has a relation's answer position read its relation word and asks it for
that word and how the two objects' rows and columns compare. Stage C fine-tunes everything at a lower
rate. The result is saved in fp16 with save_pretrained, with its processor, and its held-out accuracy
to train_log.json.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
from copy import deepcopy
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vtprune.cli import at_least  # noqa: E402
from vtprune.eval import shapes, tinyvlm  # noqa: E402

KEYS = ("colour", "shape", "digit", "cell", "centre")


def scenes(family, start, count, per_kind=3, only=None):
    """`count` train scenes from index `start` (skipping those with no question of the kinds in `only`)."""
    out = []
    i = start
    while len(out) < count:
        w, h = tinyvlm.scene_size(family, "train", i)
        scene, qs = shapes.sample("train", i, w, h, per_kind=per_kind)
        i += 1
        if only is not None:
            qs = [q for q in qs if q.kind in only]
        if qs:
            out.append((scene, shapes.render(scene), qs))
    return out


def visual_tokens(model, family, inputs):
    """LLM-side visual features before the projector (LLaVA: tower patches; Qwen: merger output)."""
    if family == "llava":
        hs = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
        return hs[:, 1:]  # drop CLS: [B, 196, D]
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    return getattr(out, "pooler_output", out)  # [sum tokens, D]


def token_pixels(family):
    """Side in pixels of the image square under one LLM-side visual token: a 16-px CLIP patch, or
    Qwen's 2 x 2 merge of 14-px patches."""
    return 16 if family == "llava" else 28


def token_labels(family, batch, rule="cover"):
    """Per LLM-side token: colour, shape, digit under it (shapes.patch_labels by `rule`: "cover" also
    labels small objects that straddle token centres), its cell of the 3 x 3 grid the questions name,
    and whether an object's centre falls in it (for counting)."""
    grid = token_pixels(family)
    labels = {k: [] for k in KEYS}
    for scene, _, _ in batch:
        lab = shapes.patch_labels(scene, grid, rule)
        rows, cols = lab["colour"].shape
        cy = (torch.arange(rows) * grid + grid // 2) * 3 // scene.height
        cx = (torch.arange(cols) * grid + grid // 2) * 3 // scene.width
        lab["cell"] = cy[:, None] * 3 + cx[None, :]
        centre = torch.zeros(rows, cols, dtype=torch.long)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            centre[min(rows - 1, (y0 + y1) // 2 // grid), min(cols - 1, (x0 + x1) // 2 // grid)] = 1
        lab["centre"] = centre
        for k in KEYS:
            labels[k].append(lab[k].reshape(-1))
    return {k: torch.cat(v) if family != "llava" else torch.stack(v) for k, v in labels.items()}


BACKGROUND_KEYS = ("colour", "shape", "digit", "centre")  # class 0 = nothing there


def class_weights(key, n, device):
    """Background tokens are most of an image: weigh them down so objects' classes are learnt."""
    if key not in BACKGROUND_KEYS:
        return None
    w = torch.ones(n, device=device)
    w[0] = 0.1
    return w


def stage_a(model, family, proc, heads, steps, batch_size, lr, log, offset, rule):
    params = list(visual_params(model, family)) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = cosine(opt, steps)
    for step in range(steps):
        batch = scenes(family, offset + step * batch_size, batch_size)
        device = next(model.parameters()).device
        inputs = proc.image_processor([img for _, img, _ in batch], return_tensors="pt").to(device)
        feats = visual_tokens(model, family, inputs)
        labels = {k: v.to(device) for k, v in token_labels(family, batch, rule).items()}
        loss = sum(F.cross_entropy(heads[k](feats).reshape(-1, heads[k].out_features), labels[k].reshape(-1),
                                   weight=class_weights(k, heads[k].out_features, device)) for k in KEYS)
        optimise(opt, sched, params, loss)
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():  # accuracy on the tokens that hold something (background would dominate)
                acc = {}
                for k in KEYS:
                    lab = labels[k].reshape(-1)
                    hit = heads[k](feats).argmax(-1).reshape(-1) == lab
                    acc[k] = hit[lab > 0].float().mean().item() if k in BACKGROUND_KEYS else hit.float().mean().item()
            log(f"A {step:5d} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return offset + steps * batch_size


def projector(model, family):
    """The module that maps vision features into the language model (LLaVA: the MLP projector; Qwen2-VL:
    the patch merger, whose output `visual_tokens` already returns)."""
    return model.model.multi_modal_projector if family == "llava" else model.model.visual.merger


def word_targets(family, proc, batch, vocab, rule="cover"):
    """[tokens, vocab]: per LLM-side visual token, a distribution spread evenly over the words that name
    what lies under it (its colour and shape, or its digit) and where (its cell's position words);
    all-zero rows for background tokens."""
    tok = proc.tokenizer
    ids = lambda words: torch.tensor(tok.convert_tokens_to_ids(list(words)))  # noqa: E731
    colour, shape, digit = ids(shapes.COLOURS), ids(shapes.SHAPES), ids(shapes.NUMBERS)
    labels = {k: v.reshape(-1) for k, v in token_labels(family, batch, rule).items()}
    n = labels["colour"].numel()
    target = torch.zeros(n, vocab)
    rows = torch.arange(n)
    for lab, words in ((labels["colour"], colour), (labels["shape"], shape), (labels["digit"], digit)):
        hit = lab > 0
        target[rows[hit], words[lab[hit] - 1]] += 1.0
    something = target.sum(1) > 0
    for cell in range(9):
        at = something & (labels["cell"] == cell)
        for w in ids(shapes.POSITIONS[cell // 3][cell % 3].split()):
            target[rows[at], w] += 1.0
    return target / target.sum(1, keepdim=True).clamp_min(1.0)


def readout(logits, proc, labels):
    """Per key (colour, shape, digit): on the tokens that hold one, how often the best-scoring of that
    key's words (logits: [tokens, vocab], the visual tokens read through the LM head) is the right one.
    Stage B can only bind a question's words to visual tokens that name them: a token that reads as
    its colour but not its shape leaves "what colour is the star ?" unanswerable (tiny-qwen2vl's stage
    B stalled at picking any colour in the scene while its shape readout was 0.68; a readout of 0.955,
    after a longer stage A, did not end that stall either: the readout alone does not predict it)."""
    tok = proc.tokenizer
    out = {}
    for key, words in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES), ("digit", shapes.NUMBERS)):
        lab = labels[key].reshape(-1).to(logits.device)
        has = lab > 0
        if has.any():
            ids = torch.tensor(tok.convert_tokens_to_ids(list(words)), device=logits.device)
            out[key] = (logits[has][:, ids].argmax(-1) + 1 == lab[has]).float().mean().item()
    return out


def stage_align(model, family, proc, steps, batch_size, lr, log, offset, rule):
    """Projector alignment, as LLaVA's first stage aligns a pretrained CLIP to the LLM with captions:
    with the vision tower frozen, train the projector so that each visual token, read through the
    (tied) LM head, names what lies under it (word_targets). Visual tokens then live in the words'
    embedding space, which the language model can look up from a question."""
    for p in visual_params(model, family):
        p.requires_grad_(False)
    params = list(projector(model, family).parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = cosine(opt, steps)
    device = next(model.parameters()).device
    for step in range(steps):
        batch = scenes(family, offset + step * batch_size, batch_size)
        inputs = proc.image_processor([img for _, img, _ in batch], return_tensors="pt").to(device)
        if family == "llava":
            with torch.no_grad():
                feats = visual_tokens(model, family, inputs)
            emb = projector(model, family)(feats).reshape(-1, model.config.text_config.hidden_size)
        else:  # the merger runs inside the tower: only it has gradients
            emb = visual_tokens(model, family, inputs)
        target = word_targets(family, proc, batch, model.config.text_config.vocab_size, rule).to(device)
        keep = target.sum(1) > 0
        logp = torch.log_softmax(model.lm_head(emb[keep]).float(), -1)
        loss = -(target[keep] * logp).sum(-1).mean()
        optimise(opt, sched, params, loss)
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():
                top = logp.argmax(-1)
                acc = target[keep].gather(1, top[:, None]).gt(0).float().mean().item()
                read = readout(model.lm_head(emb).float(), proc, token_labels(family, batch, rule))
            log(f"P {step:5d} loss {loss.item():.4f} top word names the token {acc:.3f} read through the LM head: "
                + " ".join(f"{k} {v:.3f}" for k, v in read.items()))
    for p in model.parameters():
        p.requires_grad_(True)
    return offset + steps * batch_size


def visual_params(model, family):
    return model.model.vision_tower.parameters() if family == "llava" else model.model.visual.parameters()


def qa_batch(family, proc, batch, rng, max_q):
    """Inputs and answer targets for several question/answer pairs per image, and per sample the
    chosen questions in order (their refs drive the attention supervision)."""
    texts, asked = [], []
    for _, _, qs in batch:
        chosen = rng.sample(qs, min(len(qs), rng.randint(1, max_q)))
        asked.append(chosen)
        parts = [tinyvlm.prompt(family, chosen[0].text)]
        parts += [f"{chosen[0].answer} </s>"]
        for q in chosen[1:]:
            parts += [q.text, f"{q.answer} </s>"]
        texts.append(" ".join(parts))
    inputs = proc(images=[img for _, img, _ in batch], text=texts, padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    ids = inputs["input_ids"]
    qmark = proc.tokenizer.convert_tokens_to_ids("?")
    special = torch.tensor(proc.tokenizer.convert_tokens_to_ids(tinyvlm.SPECIAL))
    targets = torch.full_like(ids, -100)
    # the answer is the word after a "?" (never a special token)
    answer = (ids[:, :-1] == qmark) & ~torch.isin(ids[:, 1:], special)
    targets[:, 1:][answer] = ids[:, 1:][answer]
    return inputs, targets, asked


def visual_cover(family, proc, batch, inputs):
    """Per sample: the positions of its LLM-side visual tokens in `inputs` and the item under each
    (shapes.patch_cover numbering, 0 = nothing)."""
    grid = token_pixels(family)
    image = proc.tokenizer.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
    out = []
    for row, (scene, _, _) in zip(inputs["input_ids"], batch):
        visual = (row == image).nonzero().squeeze(1)
        items = shapes.patch_cover(scene, grid).reshape(-1)
        if items.numel() != visual.numel():
            raise RuntimeError(f"{items.numel()} patch cells for {visual.numel()} visual tokens")
        out.append((visual, items))
    return out


def attention_targets(family, proc, batch, inputs, asked, mode="union", read=-1, query=False):
    """(sample, query position, target, exact[, layers]) for every question with something to look at.
    The target ([seq], or [heads', seq]: per block of heads) marks the tokens to look at; exact=False:
    the loss wants all attention mass on them; exact=True: the target is a distribution the attention
    should equal; layers (if given) replace the supervised layers (-1: the last one).

    mode "union": the question's "?" (where the answer is predicted) looks at the LLM-side visual tokens
    under all the items it refers to (shapes.patch_cover: every item is marked somewhere). A mean over
    several objects cannot tell which is left of which, nor how many there are, so mode "word" routes
    count and relation questions through the words that name their objects: a relation's two shape
    words each look at their object, and the last layer's "?" reads them (the first half of its heads
    the first word, the rest the second); a count's colour word looks, exactly and uniformly, at one
    token per counted object (the one it covers most) and at the <s> sink, so that the sink's share is
    1 / (count + 1), and the last layer's "?" reads that word. Other kinds are as in "union". `read`: the
    layer at which a relation's "?" reads its words (-2 leaves the last layer to compare the two). `query`
    (mode "word"): a relation's "?" also reads, at the first layer, the relation word ("left", "right",
    "above", "below") that decides its answer, which tiny-qwen2vl's had never read."""
    ids = inputs["input_ids"]
    qmark = proc.tokenizer.convert_tokens_to_ids("?")
    bos = proc.tokenizer.convert_tokens_to_ids("<s>")
    out = []
    def one(i):
        mask = torch.zeros(ids.shape[1])
        mask[i] = 1.0
        return mask

    for b, ((visual, items), qs) in enumerate(zip(visual_cover(family, proc, batch, inputs), asked)):
        def on(refs):
            mask = torch.zeros(ids.shape[1])
            mask[visual] = torch.isin(items, torch.tensor(refs)).float()
            return mask

        for pos, q in zip((ids[b] == qmark).nonzero().squeeze(1).tolist(), qs):
            if mode == "word" and q.kind == "relation":
                first, second = naming_words(proc, ids[b], pos, q)
                out += [(b, first, on(q.refs[:1]), False), (b, second, on(q.refs[1:]), False),
                        (b, pos, torch.stack([one(first), one(second)]), False, (read,))]
                if query:  # "is the <colour> <shape> <relation> the <colour> <shape> ?"
                    out.append((b, pos, one(first + 1), False, (0,)))
            elif mode == "word" and q.kind == "count":
                dist = torch.zeros(ids.shape[1])
                dist[int((ids[b] == bos).nonzero()[0])] = 1.0
                dist[visual[most_covered(batch[b][0], token_pixels(family), q.refs)]] = 1.0
                at, = naming_words(proc, ids[b], pos, q)
                out += [(b, at, dist / dist.sum(), True), (b, pos, one(at), False, (-1,))]
            elif q.refs:
                out.append((b, pos, on(q.refs), False))
    return out


def naming_words(proc, row, pos, q):
    """Positions in `row` of the words naming what a question ending at `pos` (its "?") is about: a
    relation's two shape words, in order, or a count's colour word."""
    words = shapes.SHAPES if q.kind == "relation" else shapes.COLOURS
    ids = set(proc.tokenizer.convert_tokens_to_ids(list(words)))
    n = 2 if q.kind == "relation" else 1
    return [i for i in range(pos - 1, -1, -1) if int(row[i]) in ids][:n][::-1]


def relation_asked(q):
    """The shapes.RELATIONS index a relation question asks ("is the <colour> <shape> <relation> the
    <colour> <shape> ?")."""
    return shapes.RELATIONS.index(" ".join(q.text.split()[4:-4]))


PROBE_GROUPS = {"cell": 9, "count": len(shapes.NUMBERS), "first": 9, "second": 9, "asked": 9,
                "colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES),
                "relation": len(shapes.RELATIONS), "rows": 3, "cols": 3}  # --aux-probe's outputs


def word_labels(proc, inputs, asked, batch, read=-1, query=False):
    """(sample, position, hidden state, group, class) for the --aux-probe loss, read at the words naming
    things from the input of the layer that reads them: each relation object's shape word -> its grid cell
    (3 * row + col) at hidden state `read` - 1 (-2: the last layer's input), a count's colour word -> the
    count at hidden state -2; from the output of layer `read` (hidden state `read`: -1 the last) at a
    relation's "?": the first and the second object's cells (groups "first", "second"). With `query`, the
    facts a relation's answer is decided by, at its "?": which relation it asks (group "relation",
    shapes.RELATIONS index; also at hidden state 1, where the query forms: tiny-qwen2vl's "?" had never
    read it) and, at hidden state `read`, how the two cells compare (groups "rows", "cols": 0 the first
    object's row or column is before the second's, 1 the same, 2 after). And where a query is formed, from
    the second layer's input (hidden state 1), what it looks for, so that the query holds it plainly (a
    conjunction of two words is no linear read of one state): a shape or digit question's "?" -> the cell
    it asks about (group "asked": tiny-qwen2vl, whose grid varies in size, must find a cell by content, not
    by sequence position); an exist question's "?" -> the colour and shape asked for; a relation's shape
    words -> their object's colour (the word itself is its shape); a count's colour word -> that colour."""
    ids = inputs["input_ids"]
    qmark = proc.tokenizer.convert_tokens_to_ids("?")
    out = []
    for b, qs in enumerate(asked):
        for pos, q in zip((ids[b] == qmark).nonzero().squeeze(1).tolist(), qs):
            if q.kind == "relation":
                objs = [batch[b][0].objects[ref - 1] for ref in q.refs]
                cells = [3 * o.cell[0] + o.cell[1] for o in objs]
                named = naming_words(proc, ids[b], pos, q)
                out += [(b, at, read - 1, "cell", cell) for at, cell in zip(named, cells)]
                out += [(b, at, 1, "colour", shapes.COLOURS.index(o.colour)) for at, o in zip(named, objs)]
                out += [(b, pos, read, "first", cells[0]), (b, pos, read, "second", cells[1])]
                if query:
                    (r1, c1), (r2, c2) = objs[0].cell, objs[1].cell
                    rel = relation_asked(q)
                    out += [(b, pos, 1, "relation", rel), (b, pos, read, "relation", rel),
                            (b, pos, read, "rows", (r1 > r2) - (r1 < r2) + 1), (b, pos, read, "cols", (c1 > c2) - (c1 < c2) + 1)]
            elif q.kind == "count":
                at, = naming_words(proc, ids[b], pos, q)
                out += [(b, at, 1, "colour", shapes.COLOURS.index(q.text.split()[2])), (b, at, -2, "count", len(q.refs))]
            elif q.kind in ("shape", "digit"):
                scene, ref = batch[b][0], q.refs[0]
                r, c = (scene.digits[ref - 100] if ref >= 100 else scene.objects[ref - 1]).cell
                out.append((b, pos, 1, "asked", 3 * r + c))
            elif q.kind == "exist":  # "is there a <colour> <shape> ?"
                colour, shape = q.text.split()[-3:-1]
                out += [(b, pos, 1, "colour", shapes.COLOURS.index(colour)), (b, pos, 1, "shape", shapes.SHAPES.index(shape))]
    return out


def probe_loss(probe, hidden_states, labels):
    """Mean cross-entropy of the read-out `probe` (one linear map, its outputs split into PROBE_GROUPS)
    on `labels` (word_labels), each over its own group's outputs."""
    starts = dict(zip(PROBE_GROUPS, itertools.accumulate(PROBE_GROUPS.values(), initial=0)))
    loss = 0.0
    for b, pos, state, group, cls in labels:
        logits = probe(hidden_states[state][b, pos].float())
        lo = starts[group]
        loss = loss + F.cross_entropy(logits[lo:lo + PROBE_GROUPS[group]][None], torch.tensor([cls], device=logits.device))
    return loss / max(1, len(labels))


def most_covered(scene, patch, refs):
    """Per item in `refs` (patch_ids numbering), the raster index of the patch it covers most pixels of
    (the first on ties)."""
    keys, counts = shapes.patch_counts(scene, patch)
    counts = counts.reshape(-1, len(keys))
    return torch.tensor([int(counts[:, keys.tolist().index(r)].argmax()) for r in refs], dtype=torch.long)


def attention_loss(attentions, targets, layers):
    """Over `layers` and heads, for each target: -log(attention mass on the marked tokens), or for exact
    targets the cross-entropy of the attention to the target distribution (0 where they are equal,
    up to the 1e-6 floor). A [heads', seq] target is repeated over the layer's heads in blocks."""
    if not targets:
        return 0.0
    b = torch.tensor([t[0] for t in targets])
    pos = torch.tensor([t[1] for t in targets])
    heads = attentions[0].shape[1]

    def per_head(target):  # [seq] or [blocks, seq] -> [heads, seq]
        rows = target.reshape(-1, target.shape[-1])
        return rows.repeat_interleave(heads // rows.shape[0], 0)

    mask = torch.stack([per_head(t[2]) for t in targets]).to(attentions[0].device)  # [n, heads, seq]
    exact = torch.tensor([bool(t[3]) for t in targets], device=mask.device)
    n_layers = len(attentions)
    own = [None if len(t) < 5 else {li % n_layers for li in t[4]} for t in targets]
    loss, terms = 0.0, 0
    for li in sorted(set(layers) | {li for o in own if o for li in o}):
        use = torch.tensor([li in o if o else li in layers for o in own], device=mask.device)
        if not bool(use.any()):
            continue
        att = attentions[li][b[use], :, pos[use]]  # [n, heads, seq]
        m = mask[use]
        union = -torch.log((att * m).sum(-1) + 1e-6)
        match = -(m * torch.log(att + 1e-6)).sum(-1) + (m * torch.log(m + 1e-6)).sum(-1)
        loss, terms = loss + torch.where(exact[use][:, None], match, union).mean(), terms + 1
    return loss / max(1, terms)


def background_keys(family, proc, batch, inputs):
    """[batch, seq] bool: the visual tokens with nothing under them (shapes.patch_cover 0: no object or
    digit covers an eighth of the token's pixels, and none is marked there)."""
    out = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    for b, (visual, items) in enumerate(visual_cover(family, proc, batch, inputs)):
        out[b, visual] = items == 0
    return out


@contextmanager
def key_bias(model, bias):
    """Add `bias` ([batch, seq], float) to every language-model layer's attention logits on those keys,
    for every query (eager attention: the layers' additive or boolean masks are extended)."""
    def pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:
            raise RuntimeError("key_bias needs the layers' attention mask (eager attention)")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = mask + bias[:, None, None, :].to(mask)
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
               for layer in model.model.language_model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def background_bias(at, start, stop, step):
    """The attention bias on background keys at `step`: -at until `start`, rising linearly to 0 at `stop`."""
    if step >= stop:
        return 0.0
    if step < start:
        return -at
    return -at * (1 - (step - start) / (stop - start))


def kind_hits(logits, targets, asked):
    """(kind, correct) for every answer in the batch: answer positions, in order, are the asked questions."""
    pred = logits[:, :-1].argmax(-1)
    out = []
    for b, qs in enumerate(asked):
        pos = (targets[b, 1:] != -100).nonzero().squeeze(1).tolist()
        out += [(q.kind, bool(pred[b, p] == targets[b, p + 1])) for q, p in zip(qs, pos)]
    return out


def stage_qa(model, family, proc, steps, batch_size, lr, log, offset, rng, max_q, train_visual, only=None,
             attn_sup=0.0, per_kind=3, every=None, bg_bias=None, attn_targets="union", aux_probe=0.0, read=-1,
             query=False):
    """bg_bias=(at, start, stop): while training, the language model's attention to background visual
    tokens is damped by an additive bias (background_bias), released to 0 by step `stop`: tiny-qwen2vl's
    stage B otherwise stalls at naming any colour in the scene, distracted by its background tokens."""
    for p in visual_params(model, family):
        p.requires_grad_(train_visual)
    if family != "llava" and not train_visual:
        for p in model.model.visual.merger.parameters():  # the merger is Qwen's projector
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    probe = None
    if aux_probe > 0:  # a linear read-out of hidden states (word_labels), trained alongside, then dropped
        dim = model.config.text_config.hidden_size
        probe = torch.nn.Linear(dim, sum(PROBE_GROUPS.values())).to(next(model.parameters()).device)
        params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = cosine(opt, steps)
    hits = []
    for step in range(steps):
        batch = scenes(family, offset + step * batch_size, batch_size, per_kind=per_kind,
                       only=only(step) if callable(only) else only)
        inputs, targets, asked = qa_batch(family, proc, batch, rng, max_q)
        device = next(model.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device)
        bias = background_bias(*bg_bias, step) if bg_bias else 0.0
        damp = (key_bias(model, background_keys(family, proc, batch, inputs).to(device).float() * bias)
                if bias else nullcontext())
        with damp:
            out = model(**inputs, output_attentions=attn_sup > 0, output_hidden_states=probe is not None)
        logits = out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1))
        if attn_sup > 0:  # the answer position should look at what the question is about
            n_layers = len(out.attentions)
            sup = attention_loss(out.attentions, attention_targets(family, proc, batch, inputs, asked, attn_targets, read, query),
                                 range(1, max(2, n_layers - 1)))
            loss = loss + attn_sup * sup
        labels = word_labels(proc, inputs, asked, batch, read, query) if probe is not None else []
        if labels:  # what the answer needs, readable where the question names it and where it is answered
            loss = loss + aux_probe * probe_loss(probe, out.hidden_states, labels)
        optimise(opt, sched, params, loss)
        hits += kind_hits(logits.detach(), targets, asked)
        if every is not None and (step + 1) % every[0] == 0:  # (n, save(next scene, step)): a checkpoint
            every[1](offset + (step + 1) * batch_size, step)
        if step % 25 == 0 or step == steps - 1:  # answer accuracy on the training batches since the last line
            by = {k: [h for kk, h in hits if kk == k] for k in shapes.KINDS}
            log(f"{'C' if train_visual else 'B'} {step:5d} loss {loss.item():.4f} answer acc "
                f"{sum(h for _, h in hits) / max(1, len(hits)):.3f} "
                + " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in by.items() if v)
                + (f" background bias {bias:.1f}" if bg_bias else ""))
            hits = []
    for p in model.parameters():
        p.requires_grad_(True)
    return offset + steps * batch_size


def optimise(opt, sched, params, loss):
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def cosine(opt, steps, warmup=20):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))


def curriculum(args):
    """step -> the kinds stage B trains on (None without --curriculum)."""
    if not args.curriculum:
        return None
    kinds = args.curriculum.split(",")
    unknown = set(kinds) - set(shapes.KINDS)
    if unknown:
        raise SystemExit(f"--curriculum: unknown kinds {sorted(unknown)}; kinds: {', '.join(shapes.KINDS)}")

    def at(step):
        n = 1 if step < args.first_phase else 2 + (step - args.first_phase) // args.phase
        return set(kinds[:n])

    return at


def check_starts(args):
    """--init, --vision-from and --start-scene checked before any work (a missing --init folder was a hub
    error, a missing --vision-from file or another family's a traceback, --start-scene without --init was
    ignored); returns the --vision-from checkpoint, loaded."""
    if args.init and (args.vision_from or args.reuse_vision):
        raise SystemExit("--init continues from a whole model (no stage A): drop --vision-from / --reuse-vision")
    if args.vision_from and args.reuse_vision:
        raise SystemExit("--vision-from and --reuse-vision both name a stage A to start from: use one")
    if args.start_scene is not None and not args.init:
        raise SystemExit("--start-scene applies with --init (a run from scratch starts at scene 0)")
    if args.init:
        config = Path(args.init) / "config.json"
        if not config.is_file():
            raise SystemExit(f"--init: {args.init} holds no model saved by this script")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != args.family:
            raise SystemExit(f"--init: {args.init} is a {model_type} model, not --family {args.family}")
    if not args.vision_from:
        return None
    if not Path(args.vision_from).is_file():
        raise SystemExit(f"--vision-from: no file {args.vision_from}")
    try:
        saved = torch.load(args.vision_from, map_location="cpu")
    except Exception:
        saved = None
    if not isinstance(saved, dict) or not {"model", "offset", "args"} <= saved.keys():
        raise SystemExit(f"--vision-from: {args.vision_from} is not a stage A checkpoint (vision_stage.pt)")
    if saved["args"][:1] != [args.family]:
        raise SystemExit(f"--vision-from: {args.vision_from} is not a --family {args.family} stage A "
                         f"(its settings: {saved['args']})")
    return saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["llava", "qwen2_vl"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-steps", type=at_least(0), default=400)
    ap.add_argument("--align-steps", type=at_least(0), default=300, help="projector alignment steps (stage P) before stage B")
    ap.add_argument("--qa-steps", type=at_least(0), default=1200)
    ap.add_argument("--full-steps", type=at_least(0), default=300)
    ap.add_argument("--batch", type=at_least(1), default=32)
    ap.add_argument("--max-questions", type=at_least(1), default=4, help="question/answer pairs per image per sequence")
    ap.add_argument("--per-kind", type=at_least(1), default=3, help="questions of each kind drawn per training scene")
    ap.add_argument("--eval-questions", type=at_least(1), default=1200)
    ap.add_argument("--eval-only", action="store_true", help="only (re-)evaluate the model saved in OUT")
    ap.add_argument("--reuse-vision", action="store_true", help="start from OUT/vision_stage.pt (stage A) if present")
    ap.add_argument("--vision-from", default=None,
                    help="a stage A checkpoint (vision_stage.pt) to continue stage A from for --vision-steps more steps")
    ap.add_argument("--vision-lr", type=float, default=2e-3, help="stage A learning rate")
    ap.add_argument("--init", default=None, help="continue from a model saved by this script (skips stages A and P)")
    ap.add_argument("--start-scene", type=at_least(0), default=None,
                    help="first training scene index (default 0, or where the --init run stopped)")
    ap.add_argument("--save-every", type=at_least(0), default=0, help="also save the model to OUT every N stage B/C steps")
    ap.add_argument("--only", default=None, help="comma-separated question kinds to train on (experiments)")
    ap.add_argument("--curriculum", default=None,
                    help="stage B question kinds in order, e.g. colour,shape,digit,exist,relation,count: the first "
                         "alone for --first-phase steps, then one more kind every --phase steps (cumulative)")
    ap.add_argument("--first-phase", type=at_least(0), default=500)
    ap.add_argument("--phase", type=at_least(1), default=300)
    ap.add_argument("--qa-lr", type=float, default=1e-3)
    ap.add_argument("--attn-sup", type=float, default=0.5,
                    help="weight of the attention supervision in stages B and C (0: answers only)")
    ap.add_argument("--background-bias", default=None, metavar="AT,START,STOP",
                    help="stage B: damp the language model's attention to background visual tokens by -AT until "
                         "step START, releasing it linearly to 0 at STOP (needs --attn-sup > 0: eager attention), "
                         "e.g. 30,1500,1900")
    ap.add_argument("--attn-targets", choices=["union", "word"], default="union",
                    help="what --attn-sup looks for: the tokens of every referred item from the answer position "
                         "(union), or, for count and relation questions, routed through the words naming their "
                         "objects (word; see attention_targets)")
    ap.add_argument("--aux-probe", type=float, default=0.0,
                    help="weight of an auxiliary loss (stage B/C): a linear read-out of the hidden states must find each "
                         "relation object's grid cell and each count where the question names them, both cells at "
                         "a relation's answer position, and, at the second layer's input, what each query looks "
                         "for: the asked cell (shape, digit), colour and shape (exist), a relation object's or "
                         "a count's colour (see word_labels)")
    ap.add_argument("--relation-read", type=int, choices=[-1, -2], default=-1,
                    help="--attn-targets word: the layer at which a relation's answer position reads the words "
                         "naming its objects, and whose output --aux-probe asks for their cells (-1: the last; "
                         "-2: the one before, leaving the last layer to compare them)")
    ap.add_argument("--relation-query", action="store_true",
                    help="--attn-targets word: a relation's answer position also reads the relation word at the "
                         "first layer; --aux-probe asks it for what its answer is decided by: which relation "
                         "(at the second layer's input and where it reads the two objects' words) and, there, "
                         "how the objects' rows and columns compare (before, same, after)")
    ap.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--label-rule", choices=["cover", "centre"], default="cover",
                    help="per-token labels in stages A and P (shapes.patch_labels): cover = also small objects "
                         "between token centres")
    args = ap.parse_args(argv)
    if args.only is not None:
        unknown = set(args.only.split(",")) - set(shapes.KINDS)  # (a scene with no question of the kinds: an endless search)
        if unknown:
            raise SystemExit(f"--only: unknown kinds {sorted(unknown)}; kinds: {', '.join(shapes.KINDS)}")
    curriculum(args)  # its kinds checked here, before any work
    if args.eval_only and not (Path(args.out) / "config.json").is_file():
        raise SystemExit(f"--eval-only: {args.out} holds no model saved by this script")
    vision_from = check_starts(args)
    bg_bias = None
    if args.background_bias:
        try:
            at, start, stop = (float(x) for x in args.background_bias.split(","))
        except ValueError:
            raise SystemExit(f"--background-bias: AT,START,STOP, e.g. 30,1500,1900; got {args.background_bias!r}")
        if at < 0 or not 0 <= start <= stop:
            raise SystemExit(f"--background-bias: AT >= 0 and 0 <= START <= STOP; got {args.background_bias!r}")
        if args.attn_sup <= 0:
            raise SystemExit("--background-bias needs eager attention while training: use it with --attn-sup > 0")
        bg_bias = (at, int(start), int(stop))
    if args.eval_only:
        evaluate_saved(Path(args.out), args.eval_questions)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    t0 = time.time()

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    import transformers as tf

    proc = tinyvlm.processor(args.family)
    cfg = tinyvlm.config(args.family)
    cls = tf.LlavaForConditionalGeneration if args.family == "llava" else tf.Qwen2VLForConditionalGeneration
    model = cls(cfg).to(device)
    log(f"{cls.__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {device}")
    dim = cfg.vision_config.hidden_size
    heads = torch.nn.ModuleDict({
        "colour": torch.nn.Linear(dim, len(shapes.COLOURS) + 1), "shape": torch.nn.Linear(dim, len(shapes.SHAPES) + 1),
        "digit": torch.nn.Linear(dim, 11), "cell": torch.nn.Linear(dim, 9), "centre": torch.nn.Linear(dim, 2)}).to(device)
    ckpt = out / "vision_stage.pt"
    stage_a_key = [args.family, args.seed, args.vision_steps, args.batch, args.vision_lr, args.label_rule]
    if args.init:
        init = tf.AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        prev = Path(args.init) / "train_log.json"
        offset = json.loads(prev.read_text()).get("next_scene", 0) if prev.exists() else 0
        offset = args.start_scene if args.start_scene is not None else offset
        log(f"continuing from {args.init} at training scene {offset}")
    elif args.vision_from:  # more stage A steps (e.g. with another --label-rule) after an earlier stage A
        saved = vision_from
        model.load_state_dict(saved["model"])
        log(f"stage A continued from {args.vision_from} (settings {saved['args']})")
        offset = stage_a(model, args.family, proc, heads, args.vision_steps, args.batch, args.vision_lr, log,
                         saved["offset"], args.label_rule)
        torch.save({"model": model.state_dict(), "offset": offset, "args": stage_a_key + [args.vision_from]}, ckpt)
    elif args.reuse_vision and ckpt.exists():  # the same stage A (same seed and steps) done before
        saved = torch.load(ckpt, map_location="cpu")
        if saved["args"] != stage_a_key:
            raise SystemExit(f"--reuse-vision: {ckpt} is a stage A of other settings ({saved['args']}; this run: "
                             f"{stage_a_key}, as family, seed, vision steps, batch, vision lr, label rule)")
        model.load_state_dict(saved["model"])
        offset = saved["offset"]
        log(f"stage A reused from {ckpt}")
    else:
        offset = stage_a(model, args.family, proc, heads, args.vision_steps, args.batch, args.vision_lr, log, 0,
                         args.label_rule)
        torch.save({"model": model.state_dict(), "offset": offset, "args": stage_a_key}, ckpt)
    if not args.init:
        offset = stage_align(model, args.family, proc, args.align_steps, args.batch, 2e-3, log, offset, args.label_rule)

    def save(next_scene, step=None):
        copy = type(model)(deepcopy(model.config))  # its own config: attention dispatch reads it at call time
        copy.load_state_dict(model.state_dict())
        copy.set_attn_implementation("sdpa")
        copy.half().save_pretrained(out)
        proc.save_pretrained(out)
        record = {"command": " ".join(["python", "scripts/train_tiny.py"] + (argv or sys.argv[1:])),
                  "args": vars(args), "device": device, "torch": torch.__version__, "transformers": tf.__version__,
                  "train_seconds": round(time.time() - t0, 1), "next_scene": next_scene, "log": lines}
        if step is not None:
            record["saved_at_step"] = step
        (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")

    only = set(args.only.split(",")) if args.only else None
    if args.attn_sup > 0:  # attention weights are needed: eager attention while training (SDPA after)
        model.set_attn_implementation("eager")
    every = (args.save_every, save) if args.save_every else None
    offset = stage_qa(model, args.family, proc, args.qa_steps, args.batch, args.qa_lr, log, offset, rng,
                      args.max_questions, False, curriculum(args) or only, args.attn_sup, args.per_kind, every,
                      bg_bias, args.attn_targets, args.aux_probe, args.relation_read, args.relation_query)
    offset = stage_qa(model, args.family, proc, args.full_steps, args.batch, 2e-4, log, offset, rng,
                      args.max_questions, True, only, args.attn_sup, args.per_kind, every, None, args.attn_targets, args.aux_probe,
                      args.relation_read, args.relation_query)
    save(offset)
    evaluate_saved(out, args.eval_questions)


def evaluate_saved(out: Path, n_questions: int):
    """Held-out accuracy of the saved (fp16) model, loaded back in float32 as users load it, unpruned
    and with random pruning; merged into OUT/train_log.json under "eval"."""
    import transformers as tf

    import vtprune

    model = tf.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    proc = tf.AutoProcessor.from_pretrained(out)
    t0 = time.time()
    result = {"full": tinyvlm.evaluate(model, proc, n_questions)}
    print(f"held-out accuracy {result['full']['overall']:.4f} {json.dumps(result['full']['by_kind'])}", flush=True)
    for ratio in (0.5, 0.25, 0.111):  # the benchmark must tell pruning apart: random drops should cost accuracy
        with vtprune.pruned(model, "random", ratio=ratio):
            result[f"random@{ratio}"] = tinyvlm.evaluate(model, proc, n_questions)
        print(f"random {ratio}: {result[f'random@{ratio}']['overall']:.4f}", flush=True)
    result["majority_baseline"] = shapes.majority_baseline([(q.kind, q.answer) for _, q in shapes.eval_set(n_questions)])
    result["eval_seconds"] = round(time.time() - t0, 1)
    log_path = out / "train_log.json"
    record = json.loads(log_path.read_text()) if log_path.exists() else {}
    record["eval"] = result
    log_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
