"""benchmarks/context.py runs end to end at toy sizes and writes only its own section."""

import json

from benchmarks import context as bench
from benchmarks.common import SUMMARY_FIELDS


def test_context_benchmark_writes_its_section(tmp_path, capsys):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--sizes", "1500", "3000", "--queries", "5", "--beams", "2", "8", "--corpus", "1500",
                "--write", str(target), "--json", str(tmp_path / "rows.json")])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- context:start -->"):text.index("<!-- context:end -->")]
    assert "| clustered | 3,000 | 256 | 8 |" in section and "blocked" in section
    assert "stdlib lines, hashed n-grams" in section
    assert "Targets: at n = 3,000" in section
    assert "python benchmarks/context.py --sizes 1500 3000" in section
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(set(row) == set(SUMMARY_FIELDS) for row in rows)
    whats = [row["what"] for row in rows]
    assert any(w.startswith("memory tree top-10 search, clustered, n = 3,000") for w in whats)
    assert any(w.startswith("memory tree top-10 search, stdlib lines") for w in whats)
    assert whats[-1] == "memory tree single insert, clustered, n = 3,000 vs 1,500"
    assert rows[-1]["target"].startswith("growth ≤ 2x: ")
