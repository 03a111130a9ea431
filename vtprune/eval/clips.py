"""Video files for the lmms-eval model: frames sampled evenly (as qwen-vl-utils and the Qwen3-VL processor
sample them), and lossless clips written for the bundled video task. PyAV (`av`, installed with lmms-eval) reads and writes them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def read(path, max_frames: int, multiple: int = 1, start: float | None = None, end: float | None = None,
         rate: float | None = None):
    """(frames [T, H, W, 3] uint8 RGB, transformers `VideoMetadata`): T = `max_frames` frames evenly
    spaced from the clip's first frame to its last (or over [`start`, `end`] seconds of it), rounded to
    the nearest frame: linspace(first, last, T).round(), the rule of qwen-vl-utils (lmms-eval's Qwen
    models) and of the Qwen3-VL processor. Fewer when the clip has fewer, rounded down to a multiple of
    `multiple` (a Qwen model's temporal patch: 2 frames). `metadata.frames_indices` holds the frame numbers
    taken; `fps` the file's rate; `total_num_frames` and `duration` the sampled span's (the whole clip,
    or the segment), so that `sampled_fps` is the rate of the frames taken (Qwen2.5-VL's time steps read
    it; Qwen3-VL's timestamps read the indices). `rate`: sample that many frames per second of the span
    instead: floor(seconds x rate), at least 4, still at most `max_frames` (qwen-vl-utils' rule, which
    lmms-eval's Qwen models follow with their `fps`). Never less than one temporal patch (or the whole
    clip, if shorter), whatever `max_frames`."""
    import av
    from transformers.video_utils import VideoMetadata

    if max_frames < 1 or multiple < 1:
        raise ValueError(f"max_frames and multiple must be >= 1, got {max_frames}, {multiple}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate (frames per second) must be > 0, got {rate}")
    path = os.fspath(path)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # some containers leave it 0
        height, width = stream.height, stream.width
    if (start is not None or end is not None or rate is not None) and not fps:
        raise ValueError(f"{path} has no frame rate, so it cannot be sampled by time (segment [{start}, {end}] s, "
                         f"{rate} frames a second)")
    for _ in range(2):  # a second pass only when the header's frame count was more than the frames that decode
        first = max(0, int(np.ceil(start * fps))) if start is not None else 0
        last = min(total - 1, int(np.floor(end * fps))) if end is not None else total - 1
        span = last - first + 1
        if span < 1:
            raise ValueError(f"{path}: no frames in the segment [{start}, {end}] s of a {total}-frame clip")
        by_rate = span if rate is None else max(-(-4 // multiple) * multiple, int(span / fps * rate))  # >= 4, whole patches
        n = min(max_frames, span, by_rate)
        n = max(n - n % multiple, min(span, multiple))  # a clip shorter than one temporal patch: all of it
        indices = np.linspace(first, last, n).round().astype(int)
        frames, decoded = _decode(path, indices)
        if len(frames) == n or decoded >= total:
            break
        total = decoded
    if len(frames) != n:
        raise ValueError(f"{path}: decoded {len(frames)} of the {n} frames sampled from {total}")
    meta = VideoMetadata(total_num_frames=span, fps=fps, width=width, height=height,
                         duration=span / fps if fps else None, video_backend="pyav", frames_indices=indices.tolist())
    return np.stack(frames), meta


def _decode(path: str, indices) -> tuple[list, int]:
    """(the frames at `indices` (sorted), how many frames were decoded to reach them)."""
    import av

    wanted, frames, decoded = set(indices.tolist()), [], 0
    with av.open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            if decoded in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            decoded += 1
            if decoded > indices[-1]:
                break
    return frames, decoded


def write(frames, path, fps: float = 2.0) -> Path:
    """Write RGB frames ([T, H, W, 3] uint8, or PIL images) to `path` losslessly (FFV1 in AVI: `read`
    gives the same pixels back); written to a temporary name first, so readers never see half a file."""
    import av

    from fractions import Fraction

    frames = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with av.open(os.fspath(tmp), "w", format="avi") as out:
        stream = out.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
    return path
