"""benchmarks/context.py runs end to end at toy sizes and writes only its own section."""

from benchmarks import context as bench


def test_context_benchmark_writes_its_section(tmp_path, capsys):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--sizes", "1500", "3000", "--queries", "5", "--beams", "2", "8", "--corpus", "1500",
                "--write", str(target)])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- context:start -->"):text.index("<!-- context:end -->")]
    assert "| clustered | 3,000 | 256 | 8 |" in section and "blocked" in section
    assert "stdlib lines, hashed n-grams" in section
    assert "Targets: at n = 3,000" in section
    assert "python benchmarks/context.py --sizes 1500 3000" in section
