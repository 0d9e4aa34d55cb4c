"""benchmarks/chat_reuse.py runs end to end at toy sizes and writes only its own section, with
the per-turn table and the target line."""

from benchmarks import chat_reuse as bench


def test_chat_reuse_benchmark_writes_its_section(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    rows = tmp_path / "rows.json"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--quick", "--turns", "3", "--write", str(target), "--json", str(rows)])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- chat-reuse:start -->"):text.index("<!-- chat-reuse:end -->")]
    assert "Both engines gave the same replies in every round." in section
    lines = [line for line in section.splitlines() if line.startswith("| 3 |")]
    assert len(lines) == 1
    # Turn 3 resends 2 x (32 + 24) + 32 = 144 tokens; with reuse it runs only the new ones.
    cells = [cell.strip() for cell in lines[0].split("|")]
    assert cells[2] == "144" and cells[4] == "144" and int(cells[3]) <= 33
    assert "Target: turn 3's time to first token within 1.5x of turn 1's" in section
    assert "chat turn 3 time to first token" in rows.read_text()
