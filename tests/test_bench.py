"""The benchmark runs in its tiny CPU mode and produces every figure (no timing thresholds: machines are noisy)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_tiny_produces_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"0.25", "0.5", "1.0"}
    for s in res["stages"].values():
        for k in ("data_path_slices_per_s", "raw_model_slices_per_s", "ratio", "peak_rss_gb"):
            assert s[k] > 0, k
        assert abs(s["ratio"] - s["data_path_slices_per_s"] / s["raw_model_slices_per_s"]) < 0.01
    inf = res["inference"]
    for k in ("predict_and_write_s", "raw_forward_s", "ratio", "peak_rss_gb"):
        assert inf[k] > 0, k
    assert inf["slices"] == res["volume"][0]
