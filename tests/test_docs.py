"""The repository's text stays self-contained and its Markdown renders.

(a) No tracked text file names a path of the machine that wrote it (a home or work folder) or
    links out of the repository through a relative path; benchmark reports store no absolute
    path. (b) Every relative link and #anchor of a tracked Markdown file resolves (GitHub's
    heading slugs). (c) Tables have no blank line inside and every row has the header's cells.
Each check has a negative case below, so a checker that accepts everything fails.
"""
import json
import os
import re
import subprocess
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Absolute paths of a user's or a machine's folders. Spelled in pieces so that this file does
# not match itself; "/m/root" (an Open Images label) and tempfile use are not paths of this kind.
_SEP = "/"
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])" + _SEP + r"(?:work|root)" + _SEP + r"[\w.-]"
    + r"|(?<![\w.~-])" + _SEP + r"(?:home|Users)" + _SEP + r"[A-Za-z][\w.-]*" + _SEP)
OUT_OF_REPO_LINK = re.compile(r"\.\." + _SEP + r"shared\b")


def tracked_files():
    """Tracked files and new files git does not ignore (so that a file not yet added counts)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p and os.path.isfile(
        os.path.join(ROOT, p))]


def read_text(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def machine_path_problems(rel, text):
    """Lines of `text` (file `rel`) that name a machine path or leave the repository."""
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if MACHINE_PATH.search(line) or OUT_OF_REPO_LINK.search(line):
            problems.append(f"{rel}:{n}: {line.strip()[:120]}")
    return problems


def absolute_paths_in_report(obj):
    """String values of a JSON report that are absolute paths."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in absolute_paths_in_report(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in absolute_paths_in_report(v)]
    return [obj] if isinstance(obj, str) and obj.startswith("/") else []


# --- Markdown -----------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text):
    """(line number, line) outside fenced and indented code blocks, inline code removed."""
    out, fenced, prev_blank = [], False, True
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            prev_blank = False
            continue
        if fenced:
            continue
        if line.startswith("    ") and prev_blank and not line.lstrip().startswith(("-", "*", "|")):
            continue  # an indented code block (only after a blank line; list items continue)
        prev_blank = not line.strip()
        out.append((n, re.sub(r"`+[^`]*`+", "", line)))
    return out


def github_slug(heading):
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped
    (letters, digits, spaces, '-' and '_' stay), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text):
    seen, result = {}, set()
    for _, line in prose_lines_keep_code(text):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(2))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            result.add(slug if k == 0 else f"{slug}-{k}")
        result.update(HTML_ANCHOR.findall(line))
    return result


def prose_lines_keep_code(text):
    """As prose_lines, but inline code kept (headings keep their code text in the slug)."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def link_problems(rel, text, exists, read):
    """Relative links of Markdown file `rel` that do not resolve. `exists(path)` says whether
    a repository path exists, `read(path)` gives a Markdown file's text."""
    problems = []
    base = os.path.dirname(rel)
    for n, line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http(s), mailto, ...
            path, _, anchor = target.partition("#")
            where = f"{rel}:{n}: ({target})"
            if path:
                full = os.path.normpath(os.path.join(base, path))
                if full.startswith("..") or os.path.isabs(path):
                    problems.append(f"{where} leaves the repository")
                    continue
                if not exists(full):
                    problems.append(f"{where}: no such file")
                    continue
            else:
                full = rel
            if anchor and full.endswith(".md") and anchor not in anchors(read(full)):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def table_problems(rel, text):
    """A table row after a blank line with no header of its own (the table was cut in two),
    and rows whose cell count differs from their header's."""
    problems = []
    lines = prose_lines_keep_code(text)
    sep = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")

    def cells(line):
        return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))

    header = None
    for i, (n, line) in enumerate(lines):
        is_row = line.lstrip().startswith("|")
        if not is_row:
            header = None
            continue
        nxt = lines[i + 1][1] if i + 1 < len(lines) else ""
        prev = lines[i - 1][1] if i else ""
        if sep.match(nxt.strip()):
            header = cells(line)
            continue
        if sep.match(line.strip()):
            continue
        if header is None:
            if not prev.strip():
                problems.append(f"{rel}:{n}: table row after a blank line (the table is cut)")
            else:
                problems.append(f"{rel}:{n}: table row without a header")
        elif cells(line) != header:
            problems.append(f"{rel}:{n}: {cells(line)} cells, the header has {header}")
    return problems


# --- the checks on the repository -----------------------------------------------------------

@pytest.fixture(scope="module")
def files():
    return tracked_files()


def test_no_machine_paths_or_links_out_of_the_repository(files):
    problems = []
    for rel in files:
        text = read_text(rel)
        if text is None:
            continue
        problems += machine_path_problems(rel, text)
        if rel.startswith("benchmarks/") and rel.endswith(".json"):
            problems += [f"{rel}: absolute path {p!r}"
                         for p in absolute_paths_in_report(json.loads(text))]
    assert not problems, "\n".join(problems)


def test_markdown_links_and_anchors_resolve(files):
    tracked = set(files) | {os.path.dirname(p) for p in files}
    dirs = set()
    for p in files:
        while p:
            p = os.path.dirname(p)
            dirs.add(p)

    def exists(path):
        return path in tracked or path in dirs

    def read(path):
        return read_text(path) or ""

    problems = []
    for rel in files:
        if rel.endswith(".md"):
            problems += link_problems(rel, read(rel), exists, read)
    assert not problems, "\n".join(problems)


def test_markdown_tables_render(files):
    problems = []
    for rel in files:
        if rel.endswith(".md"):
            problems += table_problems(rel, read_text(rel) or "")
    assert not problems, "\n".join(problems)


# --- the checkers catch what they are for ---------------------------------------------------

def test_machine_path_rule():
    bad = ["see " + _SEP + "work/main/README.md", 'out = "' + _SEP + 'root/out"',
           _SEP + "home/alice/x.json", "(../" + "shared/docs/x.md)"]
    good = ['{"LabelName": "/m/root"}', "tempfile.mkdtemp()", "configs/LVISv1/x.yaml",
            "$HOME/.cache", "output/demo/cascade_ce/seed1"]
    assert all(machine_path_problems("f", line) for line in bad)
    assert not any(machine_path_problems("f", line) for line in good)
    assert absolute_paths_in_report({"runs": [{"path": "/x/y"}], "n": 1}) == ["/x/y"]
    assert absolute_paths_in_report({"runs": [{"path": "out/seed1"}]}) == []


def test_github_slugs():
    assert github_slug("Multiple GPUs and machines") == "multiple-gpus-and-machines"
    assert (github_slug("mmdetection's cascade (`MODEL.CASCADE`)")
            == "mmdetections-cascade-modelcascade")
    assert github_slug("AP-fixed, AP-pool and boundary AP") == "ap-fixed-ap-pool-and-boundary-ap"
    text = "# A\n## A\n```\n# not a heading\n```\n## B: c/d\n"
    assert anchors(text) == {"a", "a-1", "b-cd"}


def test_link_checker_finds_missing_files_and_anchors():
    docs = {"docs/A.md": "# Title\n## Part one\n", "README.md": ""}
    exists = docs.__contains__
    text = ("[ok](docs/A.md#part-one) [file](docs/B.md) [anchor](docs/A.md#part-two) "
            "[web](https://x.org/a#b) [out](../x.md) `[code](nothing.md)`\n"
            "```\n[fenced](nothing.md)\n```\n[self](#nothing)\n")
    problems = link_problems("README.md", text, exists, docs.get)
    assert len(problems) == 4, problems
    assert "no such file" in problems[0] and "#part-two" in problems[1]
    assert "leaves the repository" in problems[2] and "#nothing" in problems[3]


def test_table_checker_finds_cut_tables_and_bad_rows():
    good = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |\n"
    assert table_problems("f", good) == []
    cut = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n"
    assert "cut" in table_problems("f", cut)[0]
    wide = "| a | b |\n|---|---|\n| 1 | 2 | 3 |\n"
    assert "3 cells" in table_problems("f", wide)[0]
