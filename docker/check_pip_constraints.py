"""Fail early, in one line per package, when a pin of ours contradicts a pip constraint file.

NGC PyTorch images (25.03 and later) set PIP_CONSTRAINT=/etc/pip/constraint.txt, which pins the
version of every Python package the image ships. When requirements.txt asks for another version
of one of them, `pip install` stops with a long ResolutionImpossible report; this check runs
before it and names the package and both versions instead:

    pip-constraints: tensorboard: requirements.txt wants ==2.21.0 but /etc/pip/constraint.txt pins ==2.16.2

    python docker/check_pip_constraints.py requirements.txt [CONSTRAINT_FILE ...]

Without CONSTRAINT_FILE arguments it reads the files pip would read: those named in
PIP_CONSTRAINT (space-separated) and /etc/pip/constraint.txt when it exists. Exit status: 0 when
nothing conflicts (or there is no constraint file), 1 on a conflict, 2 on a usage error.
Only direct requirements are compared; a conflict among their dependencies still surfaces in
pip's own resolver.
"""

from __future__ import annotations

import os
import sys

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name

NGC_CONSTRAINT = "/etc/pip/constraint.txt"


def parse(path: str) -> dict[str, Requirement]:
    """Name -> requirement for each requirement line of a requirements/constraints file.

    Options (-r, -c, --index-url ...), comments and lines that are not plain requirements (URLs,
    editable paths) are skipped: they pin nothing comparable.
    """
    out: dict[str, Requirement] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
            if not line or line.startswith(("#", "-")):
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.url or (req.marker is not None and not req.marker.evaluate()):
                continue
            out[canonicalize_name(req.name)] = req
    return out


def exact_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def conflicts(requirements: str, constraint_files: list[str]) -> list[str]:
    ours = parse(requirements)
    lines = []
    for cfile in constraint_files:
        for name, theirs in parse(cfile).items():
            mine = ours.get(name)
            if mine is None or not mine.specifier or not theirs.specifier:
                continue
            their_pin, my_pin = exact_version(theirs), exact_version(mine)
            if their_pin is not None:
                ok = mine.specifier.contains(their_pin, prereleases=True)
            elif my_pin is not None:
                ok = theirs.specifier.contains(my_pin, prereleases=True)
            else:
                continue  # two ranges: pip's resolver decides
            if not ok:
                lines.append(f"pip-constraints: {mine.name}: {requirements} wants {mine.specifier} "
                             f"but {cfile} pins {theirs.specifier}")
    return lines


def default_constraint_files() -> list[str]:
    files = [p for p in os.environ.get("PIP_CONSTRAINT", "").split() if p]
    if os.path.exists(NGC_CONSTRAINT) and NGC_CONSTRAINT not in files:
        files.append(NGC_CONSTRAINT)
    return files


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    requirements, files = argv[0], argv[1:]
    missing = [f for f in [requirements, *files] if not os.path.isfile(f)]
    if missing:
        print(f"pip-constraints: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    files = files or [f for f in default_constraint_files() if os.path.isfile(f)]
    if not files:
        print("pip-constraints: no constraint file (PIP_CONSTRAINT, /etc/pip/constraint.txt): nothing to check")
        return 0
    found = conflicts(requirements, files)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    print(f"pip-constraints: {requirements} agrees with {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
