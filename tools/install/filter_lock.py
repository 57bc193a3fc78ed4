#!/usr/bin/env python
"""Print part of a hashed requirements lock (each entry with its --hash lines and comments).

    python filter_lock.py LOCK --drop REGEX      # the entries whose name does not match REGEX
    python filter_lock.py LOCK --keep NAME ...   # only these entries (each must be in LOCK)

install.sh drops torch and its CUDA packages when it keeps a working torch; the GPU check's
tools/gpu_check/build_wheelhouse.sh keeps the packages the GPU image lacks. Names compare as
PEP 503 normalizes them (case, '-', '_', '.').
"""
import re
import sys

ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(lines):
    """[(normalized name or None for the header, [lines])] in file order."""
    out = [(None, [])]
    for line in lines:
        m = ENTRY.match(line)
        if m:
            out.append((normalize(m.group(1)), []))
        out[-1][1].append(line)
    return out


def main(argv):
    if len(argv) < 4 or argv[2] not in ("--drop", "--keep"):
        sys.exit(__doc__)
    with open(argv[1]) as f:
        blocks = entries(f)
    if argv[2] == "--drop":
        drop = re.compile(argv[3])
        chosen = [b for b in blocks if b[0] is None or not drop.fullmatch(b[0])]
    else:
        keep = {normalize(n) for n in argv[3:]}
        missing = keep - {name for name, _ in blocks}
        if missing:
            sys.exit(f"filter_lock: {', '.join(sorted(missing))} not pinned in {argv[1]}")
        chosen = [b for b in blocks if b[0] in keep]
    for _, lines in chosen:
        sys.stdout.writelines(lines)


if __name__ == "__main__":
    main(sys.argv)
