"""docs/reliability.md's bad-input table, generated from the corpus: `python tests/bad_inputs/table.py` rewrites it
between the marker comments (tests/test_bad_inputs_corpus.py checks it is current)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bad_inputs.cases import REPO, load_cases  # noqa: E402

BEGIN = "<!-- bad-input table: generated from tests/bad_inputs/*.yaml by tests/bad_inputs/table.py; do not edit -->"
END = "<!-- end of bad-input table -->"


def render(cases: dict[str, dict]) -> str:
    lines = ["| # | stage | what was wrong | what the user sees (abridged) | test |", "|---|---|---|---|---|"]
    for i, (name, c) in enumerate(cases.items(), start=1):
        stage = "any" if name.startswith("any-") else name.split("-")[0]
        test = c["covered_by"] if "covered_by" in c else f"bad_inputs/{name}" + (" (Ray)" if c.get("slow") else "")
        if c.get("also"):
            test += f"; {c['also']}"
        lines.append(f"| {i} | {stage} | {c['what']} | {c['shows']} | {test} |")
    return "\n".join(lines)


def replace_table(doc: str, table: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


if __name__ == "__main__":
    path = REPO / "docs" / "reliability.md"
    path.write_text(replace_table(path.read_text(), render(load_cases())))
    print(f"{path}: table of {len(load_cases())} cases written")
