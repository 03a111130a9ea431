"""benchmarks/gpu_figures.sh's `vtprune bench` parts, run on the CPU exactly as written there (only the
full-scale configs shrunk, float32 and one repetition), so that a scarce GPU session does not find a
broken command. Timings are not asserted; the rows, kept tokens and KV bytes are."""
import json
import pathlib
import re
import shlex

import pytest
import torch

from vtprune.eval import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bench_parts() -> dict[str, list[str]]:
    """{part name: its `vtprune bench ...` arguments} as the script writes them (`python3 -m vtprune bench ...`)."""
    text = (ROOT / "benchmarks" / "gpu_figures.sh").read_text().replace("\\\n", " ")
    found = re.finditer(r"part (\w+) \d+ python3 -m vtprune (bench .*?) ;;", text)
    return {m.group(1): shlex.split(m.group(2)) for m in found}


@pytest.fixture
def small_full_scale(monkeypatch):
    """The full-scale LLaVA configs with the same structure (CLIP-L/336's 24 x 24 patches, anyres tiles,
    vocabulary and token ids) but narrow, with 4 text and 2 vision layers, in float32 on the CPU."""
    monkeypatch.setattr(configs, "LLAMA2_7B", {**configs.LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4})
    monkeypatch.setattr(configs, "CLIP_L336", {**configs.CLIP_L336, "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32})
    build = configs.build
    monkeypatch.setattr(configs, "build", lambda name, device=None, dtype=None, attn="sdpa":
                        build(name, device, dtype or torch.float32, attn))


PARTS = ["bench_llava15_7b", "bench_llava15_7b_compiled", "bench_llava_next_7b", "bench_llava_next_video_7b"]


def test_the_script_names_the_bench_parts():
    assert sorted(bench_parts()) == PARTS


@pytest.mark.parametrize("part", PARTS)
def test_gpu_bench_part_runs_on_the_cpu(part, small_full_scale, tmp_path):
    from vtprune.cli import main

    args = bench_parts()[part]
    i = args.index("--out")
    assert args[i + 1] == f"results/{part}.json"
    out = tmp_path / f"{part}.json"
    args[i + 1] = str(out)
    fast = ["--reps", "1", "--new-tokens", "2"] + (["--compile-backend", "eager", "--compile-warmup", "1"]
                                                  if "--compile" in args else [])
    assert main(args + fast) == 0
    rows = json.loads(out.read_text())["rows"]
    presets = [json.loads(args[i + 1])["method"] for i, a in enumerate(args) if a == "--config"]
    methods = ["unpatched"] + args[args.index("--methods") + 1].split(",") + presets
    batches = [int(b) for b in args[args.index("--batch") + 1].split(",")]
    paths = ["eager", "compiled"] if "--compile" in args else ["eager"]
    assert [(r["batch"], r["path"], r["method"]) for r in rows] == [(b, p, m) for b in batches for p in paths for m in methods]
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["path"] == r["path"] and x["method"] == "unpatched")
        if r["method"] == "unpatched":
            continue
        if "--keep" in args:
            assert r["visual_tokens"] == int(args[args.index("--keep") + 1])
        else:  # LLaVA-NeXT at 11 %: 2928 visual tokens (2 x 2 tiles + base + newlines) -> 11 % of them;
            # NeXT-Video's 32-frame clip at 25 %: 4608 -> 1152 (36 of each frame's 144, or of the clip's)
            ratio = float(args[args.index("--ratio") + 1])
            assert r["visual_tokens"] == round(ratio * base["visual_tokens"]) and base["visual_tokens"] > 2000
        if r["path"] == "eager":
            assert r["kv_bytes"] < base["kv_bytes"]
        else:  # the static cache is sized for the unpruned prompt
            assert r["kv_bytes"] == base["kv_bytes"]


def run_script(tmp_path, *args, path=(), cpu_ok=True):
    """benchmarks/gpu_figures.sh copied into an empty tree (its parts' scripts absent, so each fails at
    once), run with `path` and then this interpreter's folder first on PATH (with --cpu-ok unless told)."""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "tree" / "benchmarks").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_figures.sh", tmp_path / "tree" / "benchmarks")
    env = dict(os.environ, PATH=os.pathsep.join([*map(str, path), os.path.dirname(sys.executable), os.environ["PATH"]]))
    return subprocess.run(["bash", str(tmp_path / "tree" / "benchmarks" / "gpu_figures.sh"),
                           *(["--cpu-ok"] if cpu_ok else []), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_script_keeps_going_after_a_failed_part_and_packs_what_it_wrote(tmp_path):
    import tarfile

    r = run_script(tmp_path, "--archive", str(tmp_path / "out" / "figures.tgz"), "--deadline", "100", "kernels", "vit")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed: kernels_gpu (exit 2) vit_gpu (exit 2)" in r.stdout  # python3: can't open file
    with tarfile.open(tmp_path / "out" / "figures.tgz") as t:
        names = sorted(t.getnames())
        env = json.load(t.extractfile("results/gpu_env.json"))
    assert names == ["results/gpu_env.json", "results/kernels_gpu.log", "results/vit_gpu.log"]
    assert env["versions"]["torch"] == torch.__version__ and env["gpu"] == (torch.cuda.get_device_name()
                                                                           if torch.cuda.is_available() else None)


def test_script_skips_parts_past_its_deadline_and_rejects_unknown_parts(tmp_path):
    r = run_script(tmp_path, "bench7b", "bench8b")
    assert r.returncode == 2 and "unknown part bench8b" in r.stderr
    assert not (tmp_path / "tree" / "results").exists()  # refused before anything ran
    for bad in ("9.5", "540s", "", "-5"):  # bash arithmetic failed: nothing ran, "all parts done", status 0
        r = run_script(tmp_path, "--deadline", bad, "kernels")
        assert r.returncode == 2 and f"--deadline takes whole seconds, got '{bad}'" in r.stderr, bad
        assert not (tmp_path / "tree" / "results").exists()
    r = run_script(tmp_path, "--deadline", "0", "bench7b")
    assert r.returncode == 1 and "bench_llava15_7b: skipped" in r.stdout
    assert "failed: bench_llava15_7b (no time)" in r.stdout
    # a short deadline with parts after it still runs the first (the reserve for later parts stops at 30 s)
    r = run_script(tmp_path, "--deadline", "80", "kernels", "vit", "bench7b")
    assert "== kernels_gpu: python3 benchmarks/kernels.py --reps 10 --out results/kernels_gpu.json (limit 30s)" in r.stdout


def test_all_runs_the_compiled_part_before_the_plain_bench_parts(tmp_path):
    """compiled7b (three cold torch.compile graphs of a 7B model) ran last and got what the others left,
    likely too little for its one target row; the plain parts, cut short, keep their batch-8/4 rows first."""
    r = run_script(tmp_path, "--deadline", "540", "all")
    started = re.findall(r"^== (\w+): (?!exit)", r.stdout, re.M)
    assert started == ["kernels_gpu", "vit_gpu", "bench_llava15_7b_compiled", "bench_llava15_7b", "bench_llava_next_7b"]
    limits = dict(re.findall(r"^== (\w+): .*\(limit (\d+)s\)$", r.stdout, re.M))
    assert int(limits["bench_llava15_7b_compiled"]) == 540 * 45 // 100
    assert bench_parts()["bench_llava15_7b"][bench_parts()["bench_llava15_7b"].index("--batch") + 1] == "8,1"


def _quick_python(tmp_path):
    """A folder with a python3 that skips the machine record (torch's import time; the times are tight)."""
    import sys

    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(f'#!/bin/sh\n[ "$1" = - ] && {{ echo {{}}; exit; }}\nexec {sys.executable} "$@"\n')
    (shim / "python3").chmod(0o755)
    return shim


def test_a_part_with_under_30_s_left_is_skipped(tmp_path):
    r = run_script(tmp_path, "--deadline", "44", "kernels", path=[_quick_python(tmp_path)])
    assert r.returncode == 1 and "== kernels_gpu: skipped" in r.stdout, r.stdout


def test_40_s_are_kept_for_each_later_part(tmp_path):
    """`all` under 220 s: what is left less 4 x 40 s for the later parts (45 s) is less than kernels' share (55 s)."""
    r = run_script(tmp_path, "--deadline", "220", "all", path=[_quick_python(tmp_path)])
    limit = int(re.search(r"== kernels_gpu: .*\(limit (\d+)s\)", r.stdout).group(1))
    assert 30 <= limit <= 220 - 15 - 4 * 40, r.stdout


def test_the_archive_is_packed_after_each_part_and_the_time_spent_counts(tmp_path):
    """A stand-in vit.py finds kernels' JSON already in the archive (a machine taken away mid-run still leaves
    it); and vit's limit counts the 5 s kernels took."""
    archive = tmp_path / "figures.tgz"
    (tmp_path / "tree" / "benchmarks").mkdir(parents=True)
    (tmp_path / "tree" / "benchmarks" / "kernels.py").write_text(
        "import sys, time\nopen(sys.argv[sys.argv.index('--out') + 1], 'w').write('{}')\ntime.sleep(5)\n")
    (tmp_path / "tree" / "benchmarks" / "vit.py").write_text(
        f"import sys, tarfile\nsys.exit(0 if 'results/kernels_gpu.json' in tarfile.open({str(archive)!r}).getnames() else 3)\n")
    r = run_script(tmp_path, "--archive", str(archive), "--deadline", "200", "kernels", "vit",
                   path=[_quick_python(tmp_path)])
    assert r.returncode == 0 and "all parts done" in r.stdout, r.stdout
    limit = int(re.search(r"== vit_gpu: .*\(limit (\d+)s\)", r.stdout).group(1))
    assert limit <= 200 - 15 - 5, r.stdout


def test_deadline_kills_a_running_part_and_keeps_what_it_wrote(tmp_path):
    """A part still running at its limit is killed (timeout's exit 124); what it wrote so far is packed.
    Its limit leaves 40 s for the part after it, which then runs (and fails at once: no script). (30 s:
    the shortest limit the script gives a part.)"""
    import tarfile
    import time

    shim = _quick_python(tmp_path)
    (tmp_path / "tree" / "benchmarks").mkdir(parents=True)
    (tmp_path / "tree" / "benchmarks" / "kernels.py").write_text(
        "import sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "open(out, 'w').write('{\"rows\": [1], \"complete\": false}')\n"
        "print('first row measured', flush=True)\n"
        "time.sleep(600)\n")
    t0 = time.monotonic()
    r = run_script(tmp_path, "--archive", str(tmp_path / "figures.tgz"), "--deadline", "87", "kernels", "vit",
                   path=[shim])
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert "== kernels_gpu: python3 benchmarks/kernels.py --reps 10 --out results/kernels_gpu.json (limit 30s)" in r.stdout
    assert "failed: kernels_gpu (exit 124) vit_gpu (exit 2)" in r.stdout
    assert took < 60  # killed at its limit, not after the 600 s sleep
    with tarfile.open(tmp_path / "figures.tgz") as t:
        assert json.load(t.extractfile("results/kernels_gpu.json")) == {"rows": [1], "complete": False}
        log = t.extractfile("results/kernels_gpu.log").read().decode()
    assert "first row measured" in log and "== kernels_gpu: exit 124 after" in log


def test_a_failed_wheel_install_still_packs_the_machine_record_and_its_log(tmp_path):
    import tarfile

    import sys

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    pins = tmp_path / "wheels" / f"requirements-{sys.version_info[0]}.{sys.version_info[1]}.txt"
    pins.write_text("broken==1.0\n")
    r = run_script(tmp_path, "--wheels", str(tmp_path / "wheels"), "--archive", str(tmp_path / "figures.tgz"), "kernels")
    assert r.returncode == 1 and "failed: installing the wheels" in r.stdout, r.stdout + r.stderr
    assert "== kernels_gpu" not in r.stdout
    with tarfile.open(tmp_path / "figures.tgz") as t:
        assert sorted(t.getnames()) == ["results/gpu_env.json", "results/wheels.log"]
        assert t.extractfile("results/wheels.log").read()  # pip's error
    # wheels made for another Python only: said so (one wheel of the wrong version stopped every part)
    pins.rename(tmp_path / "wheels" / "requirements-3.99.txt")
    r = run_script(tmp_path, "--wheels", str(tmp_path / "wheels"), "--archive", str(tmp_path / "figures.tgz"), "kernels")
    assert r.returncode == 1 and "holds wheels for Python 3.99 only; make them with" in r.stdout, r.stdout
    (tmp_path / "wheels" / "requirements-3.99.txt").unlink()  # a folder an older offline_wheels.py made
    r = run_script(tmp_path, "--wheels", str(tmp_path / "wheels"), "--archive", str(tmp_path / "figures.tgz"), "kernels")
    assert r.returncode == 1 and "holds no requirements-X.Y.txt (made by an older offline_wheels.py?)" in r.stdout
    r = run_script(tmp_path, "--wheels", str(tmp_path / "nowhere"), "--archive", str(tmp_path / "figures.tgz"), "kernels")
    assert r.returncode == 1 and f"there is no folder {tmp_path / 'nowhere'}" in r.stdout, r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
def test_without_a_gpu_the_script_stops_after_the_machine_record(tmp_path):
    """(no part could measure anything; vit.py ran ViT-B at batch 64 on the CPU until its limit)"""
    import tarfile

    r = run_script(tmp_path, "--archive", str(tmp_path / "figures.tgz"), "kernels", "vit", cpu_ok=False)
    assert r.returncode == 1 and "failed: no CUDA device" in r.stdout and "== kernels_gpu" not in r.stdout
    with tarfile.open(tmp_path / "figures.tgz") as t:
        assert t.getnames() == ["results/gpu_env.json"]


def test_each_part_is_capped_at_its_share_and_never_packs_an_earlier_run(tmp_path):
    """With --deadline 540, kernels gets at most 25 % (135 s; it had everything but 40 s per later part, so
    one that hung starved the rest), the last part what is left; a stale JSON of an earlier run is removed
    before its part runs (a part failing at once packed it as this run's)."""
    import tarfile

    (tmp_path / "tree" / "results").mkdir(parents=True)
    (tmp_path / "tree" / "results" / "kernels_gpu.json").write_text('{"complete": true, "stale": 1}')
    r = run_script(tmp_path, "--archive", str(tmp_path / "figures.tgz"), "--deadline", "540", "kernels", "vit")
    assert "(limit 135s)" in r.stdout.split("== vit_gpu")[0], r.stdout
    last = int(re.search(r"== vit_gpu: .*\(limit (\d+)s\)", r.stdout).group(1))
    assert last > 400
    with tarfile.open(tmp_path / "figures.tgz") as t:
        assert "results/kernels_gpu.json" not in t.getnames()

def test_offline_wheels_lists_what_a_torch_machine_lacks():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offline_wheels.py"), "--dest", "unused",
                          "--dry-run"], capture_output=True, text=True, check=True).stdout.split()
    names = {line.split("==")[0] for line in out}
    assert {"transformers", "huggingface-hub", "tokenizers", "timm", "open-clip-torch"} <= names
    assert not names & {"torch", "torchvision", "numpy", "pillow", "matplotlib", "vtprune", "sympy", "triton"}
    from importlib.metadata import version

    assert f"transformers=={version('transformers')}" in out  # pinned to what is installed here


def test_python_m_vtprune_is_the_cli():  # what the script calls: no install needed on the GPU machine
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vtprune", "methods"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "divprune" in r.stdout
    bad = ["bench", "--model", "nope", "--methods", "random", "--keep", "4"]
    r = subprocess.run([sys.executable, "-m", "vtprune", *bad], capture_output=True, text=True)
    assert r.returncode == 2 and "--model must be" in r.stderr


def script_parts() -> dict[str, list[str]]:
    """{part name: [script, its arguments...]} of the script's `python3 benchmarks/X.py ...` parts."""
    text = (ROOT / "benchmarks" / "gpu_figures.sh").read_text().replace("\\\n", " ")
    found = re.finditer(r"part (\w+) \d+ python3 (benchmarks/\S+ .*?) ;;", text)
    return {m.group(1): shlex.split(m.group(2)) for m in found}


def test_gpu_script_parts_take_their_arguments_as_written(tmp_path, monkeypatch, benchmark_script):
    """kernels.py and vit.py run with the script's own arguments (its --out redirected), shrunk by --quick."""
    parts = script_parts()
    assert sorted(parts) == ["kernels_gpu", "vit_gpu"]
    for name, (script, *args) in parts.items():
        i = args.index("--out")
        assert args[i + 1] == f"results/{name}.json"
        args[i + 1] = str(tmp_path / f"{name}.json")
        module = benchmark_script(pathlib.Path(script).stem)
        if name == "vit_gpu":  # the real ViT-B/16s take a minute on a CPU: a tiny timm tower instead
            import timm

            tiny = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                                                    num_heads=2, num_classes=5)
            monkeypatch.setattr(module, "models", lambda: iter([("tiny timm", tiny)]))
            module.main(args + ["--quick", "--methods", "random", "--ratios", "0.5", "--layer", "1"])
        else:
            module.main(args + ["--quick", "--sections", "attention"])
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["complete"] is True and "--reps 10" in record["command"]


def test_offline_wheels_walks_extras_that_require_their_own_package(monkeypatch, benchmark_script):
    """a[x] requires b[y], whose y extra requires a[x] again (as packages' 'all' extras do): walked once."""
    from types import SimpleNamespace

    module = benchmark_script("offline_wheels")
    dists = {"a": SimpleNamespace(version="1.0", requires=["b[y]; extra == 'x'", "c"]),
             "b": SimpleNamespace(version="2.0", requires=["a[x]; extra == 'y'", "d; python_version < '3.9'"]),
             "c": SimpleNamespace(version="3.0", requires=None)}
    calls = []

    def distribution(name):
        calls.append(name)
        if name not in dists:
            raise module.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(module.metadata, "distribution", distribution)
    assert module.closure([("a", {"x"})], "3.12") == {"a": "1.0", "b": "2.0", "c": "3.0"}  # d: not on 3.12
    assert sorted(calls) == ["a", "b", "c"]
    with pytest.raises(SystemExit, match="b requires d"):
        module.closure([("a", {"x"})], "3.8")


def test_script_wheels_take_precedence_over_what_is_installed(tmp_path):
    """--wheels installs into a folder placed first on PYTHONPATH: a wheel of `timm` 0.0.1 (a stand-in
    made here) is the timm the parts see, though another timm is installed."""
    import tarfile
    import zipfile

    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "timm-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("timm/__init__.py", "__version__ = '0.0.1'\n")
        z.writestr("timm-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: timm\nVersion: 0.0.1\n")
        z.writestr("timm-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("timm-0.0.1.dist-info/RECORD", "")
    import sys

    (wheels / f"requirements-{sys.version_info[0]}.{sys.version_info[1]}.txt").write_text("timm==0.0.1\n")
    archive = tmp_path / "figures.tgz"
    r = run_script(tmp_path, "--wheels", str(wheels), "--archive", str(archive), "--deadline", "0", "vit")
    assert r.returncode == 1 and "vit_gpu: skipped" in r.stdout, r.stdout + r.stderr
    with tarfile.open(archive) as t:
        versions = json.load(t.extractfile("results/gpu_env.json"))["versions"]
    import timm

    assert versions["timm"] == "0.0.1" != timm.__version__ and versions["torch"] == torch.__version__


def test_offline_wheels_pins_each_python_and_removes_stale_wheels(tmp_path, monkeypatch, benchmark_script):
    """One requirements-X.Y.txt per target Python (the script installs the machine's; a wheel built for
    another Python among *.whl stopped the whole install), and a wheel no list pins (an earlier run's
    other version) is deleted (it conflicted there)."""
    module = benchmark_script("offline_wheels")
    monkeypatch.setattr(module, "closure", lambda roots, version: (
        {"vtprune": "0", "transformers": "5.25.0", "regex": "2025.1.1"} if roots[0][0] == "vtprune" else {}))
    downloads = []
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, check: downloads.append(cmd))
    for stale in ("transformers-5.24.0-py3-none-any.whl", "transformers-5.25.0-py3-none-any.whl",
                  "regex-2025.1.1-cp312-cp312-manylinux_2_17_x86_64.whl"):
        (tmp_path / stale).write_bytes(b"")
    (tmp_path / "requirements-3.10.txt").write_text("old\n")
    assert module.main(["--dest", str(tmp_path), "--python-version", "3.12,3.13"]) == 0
    assert [cmd[cmd.index("--python-version") + 1] for cmd in downloads] == ["3.12", "3.13"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "regex-2025.1.1-cp312-cp312-manylinux_2_17_x86_64.whl", "requirements-3.12.txt", "requirements-3.13.txt",
        "transformers-5.25.0-py3-none-any.whl"]
    assert (tmp_path / "requirements-3.13.txt").read_text() == "regex==2025.1.1\ntransformers==5.25.0\n"
    for bad in ("3", "3.", "3.x"):
        with pytest.raises(SystemExit, match="--python-version"):
            module.main(["--dest", str(tmp_path), "--python-version", bad])
    # a pin of 2.0.0 keeps its wheel named 2.0 (versions compared as versions)
    monkeypatch.setattr(module, "closure", lambda roots, version: (
        {"vtprune": "0", "baz": "2.0.0"} if roots[0][0] == "vtprune" else {}))
    (tmp_path / "baz-2.0-py3-none-any.whl").write_bytes(b"")
    assert module.main(["--dest", str(tmp_path), "--python-version", "3.12"]) == 0
    assert (tmp_path / "baz-2.0-py3-none-any.whl").exists()
