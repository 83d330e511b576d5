"""scripts/bench_plots.py draws what the benches measured, and refuses what they did not."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SCRIPTS))

import bench_plots  # noqa: E402

BOOTSTRAP = """bootstrap,records,invocations,user_us,kernel_us,total_us,faults_per_invocation,peak_rss_mib
bench-usual,100,800,4.5,0.6,5.1,6,5.5
bench-lean,100,800,1.5,0.6,2.1,0,9.9
bench-usual,1000,200,4.3,0.2,4.5,8,12.2
bench-lean,1000,200,1.1,0.2,1.3,0,14.1
"""
LOCAL = """offered_per_second,shards,batch_size,put,acked,seconds,acked_per_second,p50_ms,p90_ms,p99_ms,max_ms
1000,4,100,3000,3000,3.1,967.7,40,70,95,120
5000,4,100,15000,15000,3.2,4687.5,55,90,160,210
"""
SVG = "{http://www.w3.org/2000/svg}"


def write_figures(directory: Path, bootstrap: str = BOOTSTRAP, local: str = LOCAL) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bootstrap.csv").write_text(bootstrap)
    (directory / "local.csv").write_text(local)
    return directory


def series(svg_path: Path) -> list:
    root = ElementTree.parse(svg_path).getroot()
    return [line.get("points").split() for line in root.iter(f"{SVG}polyline")]


def test_each_series_is_drawn_through_its_points_and_tabled(tmp_path):
    out = tmp_path / "out"
    assert bench_plots.main(["bench_plots", str(write_figures(tmp_path / "fig")), str(out)]) == 0
    boot = series(out / "bench-bootstrap-cpu.svg")
    assert [len(points) for points in boot] == [2, 2], "one line per bootstrap, one point per size"
    # Less CPU is lower on the plot: lean's line lies below usual's at every size.
    for (usual_x, usual_y), (lean_x, lean_y) in zip(
        (map(float, p.split(",")) for p in boot[0]), (map(float, p.split(",")) for p in boot[1])
    ):
        assert usual_x == lean_x and lean_y > usual_y
    assert [len(points) for points in series(out / "bench-local-latency.svg")] == [2, 2, 2]
    table = (out / "bench-figures.md").read_text()
    assert "| 100 | bench-lean | 1.50 | 0.60 | 2.10 | 2.4× | 0 | 9.9 |" in table
    assert "| 5000 | 4688 | 55 | 90 | 160 | 210 | 4 | 100 |" in table


def test_a_missing_or_broken_figures_file_is_named(tmp_path, capsys):
    missing = tmp_path / "missing"
    missing.mkdir()
    assert bench_plots.main(["bench_plots", str(missing), str(tmp_path / "out")]) == 1
    assert "bootstrap.csv: missing" in capsys.readouterr().err
    broken = write_figures(tmp_path / "broken", local=LOCAL.replace("55,90", "fast,90"))
    assert bench_plots.main(["bench_plots", str(broken), str(tmp_path / "out")]) == 1
    assert "local.csv, line 3: column 'p50_ms'" in capsys.readouterr().err
    empty = write_figures(tmp_path / "empty", bootstrap=BOOTSTRAP.splitlines()[0] + "\n")
    assert bench_plots.main(["bench_plots", str(empty), str(tmp_path / "out")]) == 1
    assert "no rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
