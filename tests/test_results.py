"""The shared result layer: markdown tables, run metadata, the optional plot, the result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dash_shampoo.results import RunRecord, markdown_table, metadata_lines, ratio, save_plot, write_report


def test_markdown_table_lines_and_escaped_pipes() -> None:
    text = markdown_table(["a", "b"], [[1, "x|y"], ["–", 2.5]])
    assert text == "| a | b |\n|---|---|\n| 1 | x/y |\n| – | 2.5 |\n"
    assert markdown_table(["only"], []) == "| only |\n|---|\n"


def test_ratio_text() -> None:
    assert ratio(None) == "–"
    assert ratio(1.0) == "1.00×" and ratio(12.345) == "12.35×"


def test_run_record_metadata_says_command_device_versions_date() -> None:
    record = RunRecord("dash-shampoo bench step", "some CPU", "cpu")
    meta = record.metadata()
    assert meta["command"] == "dash-shampoo bench step" and meta["device"] == "some CPU"
    assert meta["torch"] == torch.__version__ and meta["python"] and meta["dash_shampoo"]
    assert meta["date"].endswith("+00:00") and meta["wall_seconds"] >= 0
    lines = metadata_lines(meta)
    assert lines[0] == "- command: `dash-shampoo bench step`"
    assert f"torch {torch.__version__}" in lines[1] and meta["date"] in lines[2]
    assert record.stem(Path("out"), "step") == Path("out/step-cpu")


def test_run_record_start_prefers_the_typed_command() -> None:
    import argparse

    typed = argparse.Namespace(command_line=["dash-shampoo", "bench", "roots", "--preset", "quick"])
    record = RunRecord.start(typed, torch.device("cpu"), "default")
    assert record.command == "dash-shampoo bench roots --preset quick" and record.slug == "cpu"
    assert RunRecord.start(argparse.Namespace(), torch.device("cpu"), "default").command == "default"
    assert "threads" not in RunRecord.start(typed, torch.device("cpu"), "x", threads=False).device


def test_write_report_writes_json_markdown_and_the_plot_it_is_given(tmp_path: Path) -> None:
    def draw(report: dict, path: Path) -> bool:
        path.write_bytes(b"png")
        return True

    written = write_report(tmp_path / "sub" / "kind-cpu", {"x": 1}, "# text\n", draw)
    assert [p.name for p in written] == ["kind-cpu.json", "kind-cpu.md", "kind-cpu.png"]
    assert json.loads(written[0].read_text()) == {"x": 1} and written[1].read_text() == "# text\n"
    no_plot = write_report(tmp_path / "other", {"x": 1}, "", lambda report, path: False)
    assert [p.suffix for p in no_plot] == [".json", ".md"]


def test_save_plot_saves_the_figure_or_returns_false(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    def draw(plt):  # type: ignore[no-untyped-def]
        figure, axis = plt.subplots()
        axis.plot([0, 1], [1, 0])
        return figure

    assert save_plot(tmp_path / "a.png", draw) and (tmp_path / "a.png").stat().st_size > 0
    assert not save_plot(tmp_path / "b.png", lambda plt: None) and not (tmp_path / "b.png").exists()


def test_save_plot_without_matplotlib_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert not save_plot(tmp_path / "c.png", lambda plt: pytest.fail("drawn without matplotlib"))
    assert not (tmp_path / "c.png").exists()
    assert "matplotlib is not installed: no c.png" in capsys.readouterr().err


def test_write_report_keeps_a_dotted_stem(tmp_path: Path) -> None:
    written = write_report(tmp_path / "run.v2", {"x": 1}, "text\n")
    assert [p.name for p in written] == ["run.v2.json", "run.v2.md"]
