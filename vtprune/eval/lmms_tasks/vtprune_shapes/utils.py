"""lmms-eval hooks of the `vtprune_shapes` tasks: images are rendered from the scene index (the
benchmark is deterministic), answers are scored on their first word, overall and per question kind."""
from pathlib import Path

from vtprune.eval import clips, shapes

CLIP_FRAMES, CLIP_FPS = 8, 2  # vtprune_shapes_video: a still scene held for 4 s
CLIPS = Path.home() / ".cache" / "vtprune" / "shapes_video"  # the user's own: a shared /tmp folder could be anyone's


def doc_to_visual(doc):
    """The scene at 224 x 224 px (tiny-llava's input size)."""
    return [shapes.render(shapes.sample("eval", doc["scene"])[0])]


def doc_to_visual_dynres(doc):
    """The scene at its own size (168-280 px a side, as tiny-qwen2vl is trained and evaluated)."""
    return [shapes.render(shapes.sample("eval", doc["scene"], doc["width"], doc["height"])[0])]


def doc_to_visual_video(doc):
    """The scene at its own size held still for 8 frames at 2 fps: a lossless clip written once to
    ~/.cache/vtprune/shapes_video (an lmms-eval video task gives the model a file path)."""
    name = f"v1_scene{doc['scene']}_{doc['width']}x{doc['height']}_{CLIP_FRAMES}f.avi"  # v1: bump if rendering changes
    path = CLIPS / name
    if not path.exists():
        try:
            clips.write([doc_to_visual_dynres(doc)[0]] * CLIP_FRAMES, path, fps=CLIP_FPS)
        except OSError as e:  # PyAV's errors name no file
            raise OSError(f"vtprune_shapes_video: cannot write its clip {path} ({e}); the folder must be writable") from e
    return [str(path)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


CHOICES = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "count": shapes.NUMBERS, "digit": shapes.NUMBERS,
           "relation": ("yes", "no"), "exist": ("yes", "no")}


def doc_to_choice(doc):
    """The multiple-choice task's candidates: every answer word of the question's kind."""
    return list(CHOICES[doc["kind"]])


def process_results(doc, results):
    words = results[0].strip().split()
    hit = float(bool(words) and words[0] == doc["answer"])
    return {"accuracy": hit, **{kind: (doc["kind"], hit) for kind in shapes.KINDS}}


def _by_kind(kind):
    def aggregate(items):
        hits = [hit for k, hit in items if k == kind]
        return sum(hits) / len(hits) if hits else float("nan")

    aggregate.__name__ = f"accuracy_{kind}"
    return aggregate


colour, shape, count, relation, digit, exist = (_by_kind(k) for k in shapes.KINDS)
