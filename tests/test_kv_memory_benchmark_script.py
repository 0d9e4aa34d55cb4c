"""benchmarks/kv_memory.py runs end to end at toy sizes and writes only its own section."""

from benchmarks import kv_memory as bench


def test_kv_memory_benchmark_writes_its_section(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    rows = tmp_path / "rows.json"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--quick", "--write", str(target), "--json", str(rows)])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- kv-memory:start -->"):text.index("<!-- kv-memory:end -->")]
    lines = [line for line in section.splitlines() if line.startswith("| fp32 | 8 |")]
    assert len(lines) == 1
    ratio = float([cell.strip() for cell in lines[0].split("|")][6].rstrip("x"))
    assert ratio >= 1.0  # the padded cache holds at least what its tokens need
    assert "KV cache per request, tiny-gpt2 fp32, concurrency 8" in rows.read_text()
