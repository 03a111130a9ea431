"""scripts/train_tiny.py runs end to end (a few steps) and writes a model that loads offline."""
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_train_script_smoke(family, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_tiny
    finally:
        sys.path.pop(0)
    out = tmp_path / family
    train_tiny.main(["--family", family, "--out", str(out), "--vision-steps", "1", "--qa-steps", "1",
                     "--full-steps", "1", "--batch", "2", "--eval-questions", "12"])
    log = json.loads((out / "train_log.json").read_text())
    assert log["eval"]["full"]["n"] == 12 and "random@0.111" in log["eval"]
    import transformers as tf

    model = tf.AutoModelForImageTextToText.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float16  # shipped in fp16
    # stage A is reused from its checkpoint when the settings match
    train_tiny.main(["--family", family, "--out", str(out), "--vision-steps", "1", "--qa-steps", "1",
                     "--full-steps", "0", "--batch", "2", "--eval-questions", "6", "--reuse-vision"])
    assert any("stage A reused" in line for line in json.loads((out / "train_log.json").read_text())["log"])
