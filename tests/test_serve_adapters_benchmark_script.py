"""benchmarks/serve_adapters.py runs end to end at toy sizes (a real server, real adapters) and
writes only its own section, with the ratio and memory table and the target line."""

from benchmarks import serve_adapters as bench


def test_serve_adapters_benchmark_writes_its_section(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    rows = tmp_path / "rows.json"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--quick", "--adapters", "2", "--requests", "8", "--write", str(target),
                "--json", str(rows)])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- serve-adapters:start -->"):
                   text.index("<!-- serve-adapters:end -->")]
    lines = [line for line in section.splitlines() if line.startswith("| fp32 |")]
    assert len(lines) == 1
    cells = [cell.strip() for cell in lines[0].split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x")
    assert float(cells[5].split()[0]) > 0  # the adapters' matrices were held
    assert "Target: mixed adapters at ≥ 0.8x the base's requests/s" in section
    assert "over 2 adapters mixed in one batch" in rows.read_text()
