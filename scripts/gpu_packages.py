"""The packages the GPU check (scripts/gpu_check.sh) installs, read from this environment's metadata.

A CUDA machine is assumed to hold torch, transformers and peft (`BASE`, with whatever they require);
the check needs `NEEDS` on top. What it lacks is every distribution in the requirement closure of
`NEEDS` that the closure of `BASE` does not hold, at this environment's versions (the dev venv's, the
versions the code is tested with):

    python scripts/gpu_packages.py download-pins [--python-version 3.12]   # name==version, one a line
    python scripts/gpu_packages.py closure NAME...                          # the closure of NAMEs
    python scripts/gpu_packages.py needs                                    # NEEDS, for pip install

`gpu_check.sh --download DIR` fetches the download pins (plus `BUILD`: DeepSpeed comes as an sdist,
built offline without build isolation, and Python >= 3.12 venvs hold no setuptools). Environment
markers are evaluated for the target's Python version. The closure needs `packaging` (which
transformers requires); `needs` nothing but the standard library.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import default_environment

BASE = ("torch", "transformers", "peft")
NEEDS = ("deepspeed", "trl", "pydantic", "datasets", "pyyaml", "rich", "safetensors", "pytest", "pytest-timeout")
BUILD = ("setuptools", "wheel")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(text: str):
    from packaging.requirements import Requirement  # vendored by pip too; transformers requires packaging

    return Requirement(text)


def closure(names, python_version: str | None = None) -> dict[str, str]:
    """canonical name -> installed version of `names` and everything they require here (extras
    followed, markers evaluated with `python_version` when given). Names not installed are skipped."""
    env = default_environment()
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    todo = [(n, frozenset()) for n in names]
    while todo:
        name, extras = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        key = canonical(dist.metadata["Name"])
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | set(extras)
        versions[key] = dist.version
        for text in dist.requires or []:
            req = _requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (seen[key] or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return versions


def download_pins(python_version: str | None = None) -> list[str]:
    """name==version of what a machine holding `BASE` lacks for `NEEDS`, plus `BUILD`."""
    needed = closure(NEEDS, python_version)
    held = closure(BASE, python_version)
    build = {canonical(n): v for n, v in closure(BUILD, python_version).items() if canonical(n) in map(canonical, BUILD)}
    return [f"{name}=={version}" for name, version in sorted({**{n: v for n, v in needed.items() if n not in held}, **build}.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    pins = sub.add_parser("download-pins")
    pins.add_argument("--python-version", help="the target's Python (markers), e.g. 3.12; default: this one")
    names = sub.add_parser("closure")
    names.add_argument("names", nargs="+")
    sub.add_parser("needs")
    args = ap.parse_args(argv)
    if args.command == "download-pins":
        missing = [n for n in NEEDS + BASE if not closure([n])]
        if missing:
            print(f"gpu_packages: {', '.join(missing)} not installed in {sys.prefix}: run this in the dev venv", file=sys.stderr)
            return 1
        print("\n".join(download_pins(args.python_version)))
    elif args.command == "closure":
        print("\n".join(f"{n}=={v}" for n, v in sorted(closure(args.names).items())))
    else:
        print(" ".join(NEEDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
