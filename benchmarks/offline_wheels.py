"""Wheels to run vtprune from a checkout on an offline GPU machine that already has PyTorch.

  python benchmarks/offline_wheels.py --dest .whl --python-version 3.12,3.13
  # there:  bash benchmarks/gpu_figures.sh --wheels .whl PART...

Run it in the project's environment (vtprune installed with its `vit` extra). It walks the requirements
of vtprune[vit] through the distributions installed here, pins each to the version installed here, and
leaves out what the GPU machine brings with its PyTorch: the closure of --have (torch, torchvision,
numpy, pillow, matplotlib and everything they require). The rest is downloaded as binary wheels for the target
Python(s) on x86-64 Linux with `pip download --no-deps`, and DIR/requirements-X.Y.txt lists each
Python's pins; wheels in DIR that no list names (left by an earlier run) are deleted. `gpu_figures.sh
--wheels DIR` installs the list of the machine's Python with `pip install --no-index --no-deps
--find-links DIR --target` (pip picks the wheel built for it) and puts that folder first on PYTHONPATH,
so they take precedence over older versions installed there (a transformers older than vtprune needs).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def closure(roots: list[tuple[str, set[str]]], python_version: str) -> dict[str, str]:
    """{canonical name: installed version} of the roots and everything they require, with extras, for
    the target Python. A requirement not installed here raises: the environment is incomplete."""
    env = dict(default_environment(), python_version=python_version, python_full_version=python_version + ".0")
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()  # (name, extras) walked: extras may require their own package
    todo = [(canonicalize_name(name), frozenset(extras), None) for name, extras in roots]
    while todo:
        name, extras, wanted_by = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{wanted_by or 'the walk'} requires {name}, which is not installed here: "
                             "install vtprune[vit] first")
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate(dict(env, extra=e)) for e in extras | {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras), name))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", required=True, help="folder for the wheels")
    ap.add_argument("--python-version", default="3.12,3.13",
                    help="the GPU machine's Python (major.minor), or several, comma-separated")
    ap.add_argument("--have", default="torch,torchvision,numpy,pillow,matplotlib",
                    help="distributions the GPU machine has already, with all they require")
    ap.add_argument("--dry-run", action="store_true", help="list the wheels, download nothing")
    args = ap.parse_args(argv)
    versions = [v.strip() for v in args.python_version.split(",") if v.strip()]
    if not versions or not all(re.fullmatch(r"[0-9]+\.[0-9]+", v) for v in versions):
        raise SystemExit(f"--python-version: major.minor, comma-separated, got {args.python_version!r}")
    wanted = {}
    for version in versions:
        need = closure([("vtprune", {"vit"})], version)
        have = closure([(n, set()) for n in args.have.split(",") if n], version)
        wanted[version] = sorted((n, v) for n, v in need.items() if n not in have and n != "vtprune")
    for n, v in sorted(set().union(*wanted.values())):
        print(f"{n}=={v}")
    if args.dry_run:
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for version, pins in wanted.items():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", version, "--implementation", "cp", *platforms, "-d", str(dest),
                        *[f"{n}=={v}" for n, v in pins]], check=True)
        (dest / f"requirements-{version}.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins))
    pinned = {(n, Version(v)) for pins in wanted.values() for n, v in pins}  # (1.0 == 1.0.0)
    for stale in dest.glob("*.whl"):  # another version of a package (an earlier run's) would conflict there
        name, version, _, _ = parse_wheel_filename(stale.name)
        if (canonicalize_name(name), version) not in pinned:
            stale.unlink()
            print(f"removed {stale.name} (not pinned now)")
    for stale in dest.glob("requirements-*.txt"):
        if stale.name[len("requirements-"):-len(".txt")] not in wanted:
            stale.unlink()
    files = list(dest.glob("*.whl"))
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} wheels for Python {', '.join(versions)}, {size / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
