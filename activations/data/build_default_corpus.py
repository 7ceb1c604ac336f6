"""Rebuild the embedded default corpus (`activations/data/default_corpus.jsonl.xz`).

Maintainers only: users never run this, the compressed corpus ships in the repo.
It needs eight Debian packages' contents, unpacked with `dpkg -x`:

    apt-get download python3.11-doc r-cran-janeaustenr debian-handbook debian-reference-en developers-reference \
        debian-policy bible-kjv bible-kjv-text
    for p in python3.11-doc r-cran-janeaustenr debian-handbook debian-reference-en developers-reference debian-policy; do
        dpkg -x ${p}_*.deb $p; done
    dpkg -x bible-kjv_*.deb kjv && dpkg -x bible-kjv-text_*.deb kjv
    pip install rdata
    python activations/data/build_default_corpus.py --python-docs python3.11-doc --austen r-cran-janeaustenr \
        --handbook debian-handbook --debian-reference debian-reference-en --developers-reference developers-reference \
        --policy debian-policy --kjv kjv

Sources (all human-written English):
  * Jane Austen's six novels (public domain; Project Gutenberg texts as packaged by
    the janeaustenr R package), one document per chapter.
  * The Python 3.11 documentation (PSF License 2.0), reStructuredText sources with
    code blocks, doctests, tables and markup removed, one document per page.
  * The Debian Administrator's Handbook, Debian 11 edition, by Raphaël Hertzog and
    Roland Mas (CC BY-SA 3.0 / GPL-2+), paragraph text only, one document per section.
  * The Debian Reference (Osamu Aoki, GPL-2+) and the Debian Developer's Reference
    (GPL-2), and the Debian Policy Manual (GPL-2+), paragraph text only, one document
    per chapter.
The held-out split is fixed by a hash of each document id, so it never changes.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import re
import zlib
from html.parser import HTMLParser
from pathlib import Path

HELDOUT_PERCENT = 35  # ~1.4M held-out tokens: the feature atlas reads 1M, labels are scored on the rest
CODE_DIRECTIVES = {
    "code-block", "code", "doctest", "testcode", "testoutput", "productionlist", "literalinclude",
    "sourcecode", "highlight", "csv-table", "list-table", "table", "image", "figure", "toctree",
    "index", "include", "raw", "only", "audit-event-table", "availability",
}


def order_key(doc_id: str) -> str:
    return hashlib.sha256(f"order:{doc_id}".encode()).hexdigest()


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def write_corpus(docs: list[dict], out: Path) -> None:
    """Write {"id", "text"} documents as an embedded corpus: in the fixed hash order, each with its
    fixed split, xz-compressed, atomically."""
    docs = sorted(docs, key=lambda d: order_key(d["id"]))
    payload = "".join(json.dumps({**d, "split": split_of(d["id"])}, ensure_ascii=False) + "\n" for d in docs)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(lzma.compress(payload.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(out)


# ---------------------------------------------------------------- Jane Austen (R serialised data)
def austen_documents(root: Path) -> list[dict]:
    import rdata  # maintainer-only dependency

    base = next(root.rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    blob = base.with_suffix(".rdb").read_bytes()
    docs = []
    for book, (offset, length) in index["variables"].items():
        raw = blob[int(offset): int(offset) + int(length)]
        lines = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))]
        text = "\n".join(lines)
        chapters = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text)
        for i, chapter in enumerate(chapters):
            chapter = re.sub(r"\n{3,}", "\n\n", chapter).strip()
            if len(chapter) > 200:
                docs.append({"id": f"austen/{book}/{i:03d}", "text": chapter})
    return docs


# ---------------------------------------------------------------- Python docs (reStructuredText)
ROLE = re.compile(r":[a-zA-Z:+-]+:`(?:([^`<]*?)\s*<[^`>]*>|!?~?([^`]*))`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_+")


def _inline(line: str) -> str:
    line = ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").strip(), line)
    line = LINK.sub(r"\1", line)
    line = re.sub(r"``([^`]+)``", r"\1", line)
    line = re.sub(r"`([^`]+)`_*", r"\1", line)
    line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", line)
    line = re.sub(r"\|([\w -]+)\|", r"\1", line)
    return line


def rst_to_prose(source: str) -> str:
    out: list[str] = []
    skip_indent: int | None = None  # skip every line indented deeper than this
    for raw in source.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        directive = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if directive:
            if directive.group(1) in CODE_DIRECTIVES:
                skip_indent = indent
            out.append("")
            continue  # prose directives (note, versionadded, function) keep their body
        if stripped.startswith(".. ") or stripped == "..":
            skip_indent = indent  # comment or link target
            out.append("")
            continue
        if re.fullmatch(r"([=\-~^*#+\"'`.:_])\1{2,}", stripped) or stripped.startswith(("+--", "+==", "===")):
            continue  # heading underline or table rule
        if stripped.startswith((">>>", "...", "$ ", "|")) or stripped.startswith(":") and stripped.count(":") >= 2 and indent > 0:
            continue  # doctest, shell, line block, field list of a directive
        if stripped.endswith("::"):
            skip_indent = indent
            out.append("")
            stripped = stripped[:-2].rstrip()
            if stripped.endswith(":") or not stripped:
                stripped = stripped.rstrip(":")
            else:
                stripped += ":"
            if not stripped:
                continue
        out.append(_inline(stripped) if stripped else "")
    text = "\n".join(out)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    # keep paragraphs that read as prose: enough words, mostly letters
    keep = [p for p in paragraphs if len(p.split()) >= 4 and sum(c.isalpha() or c.isspace() for c in p) > 0.7 * len(p)]
    return "\n\n".join(keep)


def python_doc_documents(root: Path) -> list[dict]:
    sources = sorted(next(root.rglob("html/_sources")).rglob("*.rst.txt"))
    docs = []
    for path in sources:
        rel = path.relative_to(path.parents[len(path.relative_to(next(root.rglob('html/_sources'))).parts) - 1]).as_posix()
        text = rst_to_prose(path.read_text(encoding="utf-8"))
        if len(text) > 200:
            docs.append({"id": f"pydocs/{rel.removesuffix('.rst.txt')}", "text": text})
    return docs


# ---------------------------------------------------------------- Debian Administrator's Handbook (HTML)
class _ParagraphCollector(HTMLParser):
    """Collects paragraph and definition text (<p>, <dd>, publican's <div class="para">), skipping code."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth = 0
        self._skip = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("p", "dd") or (tag == "div" and ("class", "para") in attrs):
            self._depth += 1
        elif tag == "div" and self._depth:
            self._depth += 1  # nested div inside a paragraph: track so the right close ends it
        elif tag in ("pre", "code", "script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("p", "dd", "div") and self._depth:
            self._depth -= 1
            if self._depth:
                return
            text = " ".join("".join(self._buf).split())
            if text:
                self.paragraphs.append(text)
            self._buf = []
        elif tag in ("pre", "code", "script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._buf.append(data)


def html_book_documents(root: Path, name: str, pattern: str) -> list[dict]:
    docs = []
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        collector = _ParagraphCollector()
        collector.feed(path.read_text(encoding="utf-8"))
        keep = [p for p in collector.paragraphs if len(p.split()) >= 6]
        text = "\n\n".join(keep)
        if len(text) > 200:
            docs.append({"id": f"{name}/{path.stem.removesuffix('.en')}", "text": text})
    return docs


# ---------------------------------------------------------------- King James Bible
def kjv_documents(root: Path) -> list[dict]:
    """Dump the text with the package's own `bible` program, one document per chapter."""
    import subprocess

    program, data = next(root.rglob("usr/bin/bible")), next(root.rglob("bible.data"))
    text = subprocess.run([str(program.resolve()), "-d", data.name, "Gen1:1-Rev22:21"], cwd=data.parent, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout  # exits 255 even on success; -d is relative to its search path
    docs, verses, chapter = [], [], None
    for line in text.splitlines() + ["End 0"]:
        header = re.fullmatch(r"(\S.*) (\d+)", line)
        if header:
            if chapter and verses:
                docs.append({"id": f"kjv/{chapter}", "text": " ".join(verses)})
            chapter, verses = f"{header.group(1)} {header.group(2)}", []
        elif line.strip():
            verse = re.match(r"\s+\d+ (.*)", line)
            if verse:
                verses.append(verse.group(1).strip())
            elif verses:  # continuation of a wrapped verse
                verses[-1] += " " + line.strip()
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-docs", type=Path, required=True, help="folder where python3.11-doc was unpacked")
    parser.add_argument("--austen", type=Path, required=True, help="folder where r-cran-janeaustenr was unpacked")
    parser.add_argument("--handbook", type=Path, required=True, help="folder where debian-handbook was unpacked")
    parser.add_argument("--debian-reference", type=Path, required=True, help="folder where debian-reference-en was unpacked")
    parser.add_argument("--developers-reference", type=Path, required=True, help="folder where developers-reference was unpacked")
    parser.add_argument("--policy", type=Path, required=True, help="folder where debian-policy was unpacked")
    parser.add_argument("--kjv", type=Path, required=True, help="folder where bible-kjv and bible-kjv-text were unpacked")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "default_corpus.jsonl.xz")
    args = parser.parse_args()
    docs = austen_documents(args.austen) + python_doc_documents(args.python_docs) + html_book_documents(args.handbook, "debian-handbook", "html/en-US/*.html")
    docs += html_book_documents(args.debian_reference, "debian-reference", "*.en.html")
    docs += html_book_documents(args.developers_reference, "developers-reference", "developers-reference/*.html")
    docs += html_book_documents(args.policy, "debian-policy", "policy.html/*.html")
    docs += kjv_documents(args.kjv)
    write_corpus(docs, args.out)
    n_chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {n_chars / 1e6:.1f}M characters -> {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
