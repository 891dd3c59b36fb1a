"""Every citation of docs/METHOD.md in the code, tests and README points at a section or
step that the document has, and every function it names exists."""
import importlib
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def method_sections():
    """{section number: set of step numbers} read off docs/METHOD.md's headings and lists."""
    sections, current = {}, None
    with open(os.path.join(ROOT, "docs", "METHOD.md")) as f:
        for line in f:
            heading = re.match(r"## (\d+)\. ", line)
            if heading:
                current = int(heading.group(1))
                sections[current] = set()
            step = re.match(r"\s{0,3}(\d+)\. \*\*", line)
            if step and current is not None:
                sections[current].add(int(step.group(1)))
    return sections


def cited_files():
    listed = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True,
                            text=True).stdout.split()
    return [p for p in listed if p not in ("docs/METHOD.md", "tests/test_docs.py")] or \
        [p for p in os.listdir(ROOT) if p.endswith((".py", ".md"))]


def test_every_citation_resolves():
    sections = method_sections()
    assert set(sections) == {1, 2, 3, 4, 5, 6} and sections[3] == set(range(1, 11))
    citations = 0
    for path in cited_files():
        text = open(os.path.join(ROOT, path)).read()
        assert "METHOD.md" not in text.replace("docs/METHOD.md", ""), f"{path}: cite docs/METHOD.md"
        for match in re.finditer(r"docs/METHOD\.md(?: section (\d+))?(?: steps? (\d+)(?: and (\d+))?)?", text):
            citations += 1
            section = int(match.group(1) or 3)
            assert section in sections, f"{path}: {match.group(0)}"
            for step in filter(None, match.group(2, 3)):
                assert int(step) in sections[3], f"{path}: {match.group(0)}"
    assert citations >= 15


def test_every_function_the_document_names_exists():
    """docs/METHOD.md and the README's step map name functions: each must exist."""
    text = "".join(open(os.path.join(ROOT, *p)).read() for p in (("docs", "METHOD.md"), ("README.md",)))
    names = set(re.findall(r"`((?:train|model|prototypes|cutmix|data|evaluate)\.[A-Za-z_.]+)`", text))
    names -= {m + ".py" for m in ("train", "model", "prototypes", "cutmix", "data", "evaluate")}
    names |= {"prototypes." + n for n in re.findall(r"`(PrototypeBank\.[a-z_]+)`", text)}
    assert len(names) >= 20
    for name in sorted(names):
        module, *attributes = name.split(".")
        obj = importlib.import_module(module)
        for attribute in attributes:
            assert hasattr(obj, attribute), f"docs/METHOD.md names {name}, which does not exist"
            obj = getattr(obj, attribute)
