"""Documents for perplexity: local text files, an optional `datasets` split, and the
offline public-domain long text (King James Bible) used for the real-model check.

Nothing is downloaded here: an evaluation must not change with the network, so missing
inputs raise an error that names how to install them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.loading import DatasetSource

TEXT_SUFFIXES = (".txt", ".md")
KJV_MODULE = "engKJV2006eb"  # module name inside Debian's sword-text-kjv
SWORD_DIRS = (Path("/usr/share/sword"), Path.home() / ".sword")
KJV_INSTALL_TARGET = "make eval-texts"
KJV_INSTALL_STEPS = "apt-get install sword-text-kjv && pip install pysword"
# Shipped with pi-lora (package data): 38 public-domain Shakespeare plays; two are held out
# of every training set pi-lora ships (demo, evidence), so eval can score them by default
PLAYS_PATH = Path(__file__).resolve().parents[1] / "demo" / "data" / "plays.jsonl.gz"
HELD_OUT_PLAYS = ("hamlet", "the-tempest")
SHIPPED_SOURCE = "pi-lora shipped text: Shakespeare (public domain)"


@dataclass(frozen=True)
class Document:
    """A text to score; `source` says where it came from (path or dataset id) for the report."""

    name: str
    text: str
    source: str


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if path.is_file():
        return [path]
    raise PiLoraError(
        f"document {path} does not exist", field="documents", fix="pass .txt/.md files or dirs"
    )


def load_documents(paths: Sequence[Path]) -> list[Document]:
    """Files as given; directories contribute their .txt/.md files (recursive, sorted)."""
    documents = []
    for path in map(Path, paths):
        files = _text_files(path)
        if not files:
            raise PiLoraError(
                f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files", field="documents"
            )
        for file in files:
            name = str(file.relative_to(path)) if path.is_dir() else file.name
            documents.append(Document(name, _read_text(file), str(file)))
    return documents


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PiLoraError(f"document {file} is not UTF-8 text (byte {exc.start})",
                          field="documents", fix="pass UTF-8 text files") from None
    except OSError as exc:
        raise PiLoraError(f"cannot read document {file}: {exc.strerror}", field="documents",
                          fix="check the path and its permissions") from None


def shipped_documents() -> list[Document]:
    """The held-out plays pi-lora ships: eval's perplexity text when none is given (~70K
    tokens together, enough for windows up to ~32K; pass --docs for longer windows)."""
    import gzip
    import json

    with gzip.open(PLAYS_PATH, "rt", encoding="utf-8") as lines:
        plays = [json.loads(line) for line in lines]
    return [Document(f"{p['name']} (shipped)", p["text"], SHIPPED_SOURCE)
            for p in plays if p["name"] in HELD_OUT_PLAYS]


def load_dataset_documents(source: DatasetSource, text_field: str = "text",
                           max_documents: int | None = None) -> list[Document]:
    """Rows of a `datasets` split as documents (only when the user asks for one)."""
    import datasets  # heavy; only needed for this option

    rows = datasets.load_dataset(source.name, source.config, split=source.split,
                                 revision=source.revision)
    if text_field not in rows.column_names:
        raise PiLoraError(
            f"dataset {source.name} has no column {text_field!r} (columns: {rows.column_names})",
            field="dataset_text_field", fix="name the text column")
    count = len(rows) if max_documents is None else min(max_documents, len(rows))
    label = f"{source.name}:{source.config or ''}:{source.split}"
    texts = [rows[i][text_field] for i in range(count)]
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise PiLoraError(f"row {bad} of {label} holds {type(texts[bad]).__name__}, not text, in "
                          f"column {text_field!r}", field="dataset_text_field",
                          fix="name a column of strings")
    return [Document(f"{label}#{i}", text, label) for i, text in enumerate(texts)]


def find_kjv_module(search_dirs: Sequence[Path] = SWORD_DIRS) -> Path:
    """The SWORD data dir that holds the KJV module; a clear error when it is not installed."""
    for root in search_dirs:
        if (root / "mods.d" / f"{KJV_MODULE}.conf").is_file():
            return root
    raise PiLoraError(
        f"the King James Bible text (SWORD module {KJV_MODULE}) is not installed "
        f"(looked in {', '.join(map(str, search_dirs))})",
        fix=f"run `{KJV_INSTALL_TARGET}` ({KJV_INSTALL_STEPS})",
    )


def load_kjv_text(search_dirs: Sequence[Path] = SWORD_DIRS) -> Document:
    """The whole KJV (Genesis 1:1 first), verses joined by newlines: 4.2 MB, ~1.06M tokens."""
    root = find_kjv_module(search_dirs)
    try:
        from pysword.modules import SwordModules
    except ImportError as exc:
        raise PiLoraError(
            "reading the King James Bible needs the pure-Python package pysword",
            fix=f"run `{KJV_INSTALL_TARGET}` ({KJV_INSTALL_STEPS})",
        ) from exc
    modules = SwordModules(str(root))
    modules.parse_modules()
    bible = modules.get_bible_from_module(KJV_MODULE)
    return Document("King James Bible (KJV)", bible.get(join="\n"), f"{root}:{KJV_MODULE}")
