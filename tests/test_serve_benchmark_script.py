"""benchmarks/serve.py runs end to end at toy sizes (tiny model only) and writes only its own
section."""

from benchmarks import serve as bench


def test_serve_benchmark_writes_its_section(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- decode:start -->\nkeep me\n<!-- decode:end -->\n")
    bench.main(["--models", "tiny-gpt2", "--rounds", "1", "--tiny-requests", "2", "4", "8",
                "--load-requests", "40", "--load-concurrency", "8", "--write", str(target)])
    text = target.read_text()
    assert "keep me" in text
    section = text[text.index("<!-- serve:start -->"):text.index("<!-- serve:end -->")]
    assert "| tiny-gpt2 | fp32 | 8 | 4 |" in section
    assert "Every timed request above answered 200." in section
    assert "Load: 40 requests at concurrency 8" in section and "200: 40" in section
    assert "0 responses were a 5xx other than 503" in section
    assert "--models tiny-gpt2" in section
