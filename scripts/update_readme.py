"""Regenerate the README blocks that come from measured data (never typed by hand)."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vtprune.eval import tinyvit, tinyvlm  # noqa: E402

readme = ROOT / "README.md"
text = readme.read_text()
text = re.sub(r"(<!-- accuracy:start -->\n).*?(<!-- accuracy:end -->)",
              lambda m: m.group(1) + tinyvlm.accuracy_table() + "\n" + m.group(2), text, flags=re.S)
text = re.sub(r"(<!-- vit-accuracy:start -->\n).*?(<!-- vit-accuracy:end -->)",
              lambda m: m.group(1) + tinyvit.readme_table() + "\n" + m.group(2), text, flags=re.S)
sys.path.insert(0, str(ROOT / "scripts"))
from split_overlap import readme_note  # noqa: E402

text = re.sub(r"(<!-- overlap:start -->\n).*?(<!-- overlap:end -->)",
              lambda m: m.group(1) + readme_note(ROOT / "results" / "split_overlap.json") + "\n" + m.group(2), text,
              flags=re.S)
readme.write_text(text)
print("README.md updated")
