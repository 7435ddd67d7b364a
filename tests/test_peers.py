"""The peer benchmark's driver (benchmarks/peers): its schedule, environments and arithmetic,
on synthetic step records; no virtualenv, no model, no training (seconds)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.peers import bench_peers, report
from benchmarks.peers.results import Result, ratio_summary, summarize_run, wave_ratios
from benchmarks.peers.waves import (
    PI_LORA,
    Setting,
    allocator_environment,
    parse_setting,
    schedule,
    tool_environment,
)
from pi_lora.core import allocator

PEERS = ["llamafactory", "axolotl", "plain"]
DEFAULTS, KEPT = Setting("defaults"), Setting("kept-attn", ("training.recompute_attention=false",))


def _library(tmp_path: Path) -> Path:
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    return library


def test_schedule_pairs_each_setting_with_each_peer_in_alternating_order() -> None:
    waves = schedule([2048, 4096], ["tcmalloc", "glibc"], [DEFAULTS, KEPT], PEERS, repeats=4)
    assert len(waves) == 2 * 2 * 2 * 3 * 4 and [w.index for w in waves] == list(range(len(waves)))
    for wave in waves:  # two processes: the setting's pi-lora run and its one peer
        assert sorted(wave.order) == sorted([PI_LORA, wave.peer])
    comparisons: dict[tuple, list[tuple[str, str]]] = {}
    for wave in waves:
        comparisons.setdefault(wave.comparison, []).append(wave.order)
    assert len(comparisons) == 2 * 2 * 2 * 3
    for (_, _, _, peer), orders in comparisons.items():
        # A B, B A, A B, B A: the first place alternates, flattened A B B A A B B A
        assert orders == [(PI_LORA, peer), (peer, PI_LORA)] * 2
    # pi-lora meets every peer, as often as each other (not one neighbour throughout)
    neighbours = [w.peer for w in waves]
    assert {p: neighbours.count(p) for p in PEERS} == dict.fromkeys(PEERS, len(waves) // 3)


def test_parse_setting() -> None:
    assert parse_setting("defaults") == DEFAULTS
    assert parse_setting("kept-attn:training.recompute_attention=false,training.loss_chunk_tokens=256") \
        == Setting("kept-attn", ("training.recompute_attention=false", "training.loss_chunk_tokens=256"))
    # a comma inside a value (a list) does not split it
    assert parse_setting("t:lora.target_modules=[q_proj,v_proj]").overrides == (
        "lora.target_modules=[q_proj,v_proj]",)
    for bad in (":x=1", "n:novalue", "bad name"):
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_tcmalloc_preloads_the_same_library_for_every_tool(tmp_path: Path) -> None:
    library = _library(tmp_path)
    shell = {"PATH": "/bin", "LD_PRELOAD": "/x/libjemalloc.so.2", allocator.PRELOADED_ENV: "1",
             "THP_MEM_ALLOC_ENABLE": "1"}

    def env(tool: str, chosen: str) -> dict[str, str]:
        return tool_environment(tool, allocator_environment(chosen, library), threads=1,
                                timer=tmp_path / "t.jsonl", pythonpath=["hook"], base=shell)

    tcmalloc = {tool: env(tool, "tcmalloc") for tool in [PI_LORA, *PEERS]}
    assert {e["LD_PRELOAD"] for e in tcmalloc.values()} == {str(library)}
    keys = {k for e in tcmalloc.values() for k in e if "TCMALLOC" in k or k.startswith("PI_LORA")}
    assert all(e[k] == tcmalloc[PI_LORA][k] for e in tcmalloc.values() for k in keys)
    glibc = {tool: env(tool, "glibc") for tool in [PI_LORA, *PEERS]}
    assert not any("LD_PRELOAD" in e for e in glibc.values())  # the shell's jemalloc is dropped too
    for chosen in (tcmalloc, glibc):
        assert all(e["OMP_NUM_THREADS"] == "1" and e["PATH"] == "/bin" for e in chosen.values())
        assert "THP_MEM_ALLOC_ENABLE" not in chosen["plain"]
        # pi-lora re-runs itself under neither: preloaded already, or glibc chosen
        assert allocator.tcmalloc_environment(chosen[PI_LORA], library) is None
    assert glibc[PI_LORA][allocator.ALLOCATOR_ENV] == "glibc"
    with pytest.raises(SystemExit, match="not installed"):
        allocator_environment("tcmalloc", None)


def _records(cpu: list[float], *, tcmalloc: bool = True, peak: float = 2e9) -> list[dict]:
    steps = [{"event": "step", "step": i + 1, "user_s": c - 0.5, "sys_s": 0.5, "wall_s": c,
              "minflt": 1000 * (i + 1)} for i, c in enumerate(cpu)]
    return [*steps, {"event": "loss", "step": 1, "loss": 4.5},
            {"event": "end", "peak_rss": peak, "tcmalloc": tcmalloc}]


def test_summary_median_and_spread_leave_the_warmup_out() -> None:
    fields = summarize_run(_records([50.0, 30.0, 28.0, 33.0, 29.0, 31.0, 40.0]), warmup_steps=1,
                           timed_steps=6, returncode=0, allocator="tcmalloc")
    assert fields["status"] == "ok" and fields["steps"] == 7
    assert fields["step_cpu_s"] == [30.0, 28.0, 33.0, 29.0, 31.0, 40.0]
    assert (fields["cpu_s"], fields["cpu_min_s"], fields["cpu_max_s"]) == (30.5, 28.0, 40.0)
    assert fields["sys_s"] == 0.5 and fields["minflt"] == 4500 and fields["peak_rss_gb"] == 2.0
    assert fields["first_step_cpu_s"] == 50.0 and fields["loss1"] == 4.5
    short = summarize_run(_records([50.0, 30.0]), warmup_steps=1, timed_steps=6, returncode=0,
                          allocator="tcmalloc")
    assert short["status"].startswith("failed")
    wrong = summarize_run(_records([1.0] * 7, tcmalloc=True), warmup_steps=1, timed_steps=6,
                          returncode=0, allocator="glibc")
    assert wrong["status"] == "wrong allocator (tcmalloc loaded)"


def _result(tool: str, wave: int, cpu: float, rss: float, position: int) -> Result:
    return Result(tool, 2048, "ok", wave=wave, allocator="glibc", position=position,
                  setting="defaults" if tool == PI_LORA else None, cpu_s=cpu, peak_rss_gb=rss,
                  step_cpu_s=[cpu])


def test_ratios_are_taken_within_waves_only() -> None:
    # the machine got 3x slower between the waves: cross-wave division would give 0.33 or 1.5,
    # the medians' ratio 0.8; within each wave pi-lora is 0.5x and 1.0x its peer
    results = [_result(PI_LORA, 0, 10.0, 2.0, 0), _result("axolotl", 0, 20.0, 4.0, 1),
               _result("axolotl", 1, 30.0, 4.0, 0), _result(PI_LORA, 1, 30.0, 3.0, 1)]
    ratios = wave_ratios(results)
    assert [(r.wave, r.cpu, r.rss, r.pi_lora_first) for r in ratios] == [
        (0, 0.5, 0.5, True), (1, 1.0, 0.75, False)]
    cpu, rss = ratio_summary(ratios)[(2048, "glibc", "defaults", "axolotl")]
    assert (cpu.median, cpu.low, cpu.high, cpu.n) == (0.75, 0.5, 1.0, 2)
    assert (rss.median, rss.low, rss.high) == (0.625, 0.5, 0.75)
    # a failed run leaves its wave without a ratio instead of borrowing another wave's
    results[1].status = "failed (exit 1, 0 steps)"
    assert [r.wave for r in wave_ratios(results)] == [1]


def test_driver_end_to_end_on_fake_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() with training replaced by a fake process that writes timer records: the JSON
    holds each wave's order, loads, allocator, versions; the table says what was measured."""
    library = _library(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"rope_theta": 10000.0}))
    monkeypatch.setattr(bench_peers, "find_tcmalloc", lambda: library)
    monkeypatch.setattr(bench_peers, "prepare_model", lambda target: model)
    monkeypatch.setattr(bench_peers, "prepare_data", lambda folder, m, length: tmp_path / "d.jsonl")
    monkeypatch.setattr(bench_peers, "ensure_venv", lambda tool, venv_dir: Path("/venv/python"))
    seen: list[tuple[str, str | None]] = []

    def fake_run(command, **kwargs):
        if "-c" in command or command[0] == "git":
            return subprocess.CompletedProcess(command, 0, stdout='{"torch": "2.13.0"}', stderr="")
        env = kwargs["env"]
        tool = PI_LORA if "pi_lora.cli" in command else Path(kwargs["cwd"]).name.split("-")[-1]
        seen.append((tool, env.get("LD_PRELOAD")))
        cpu = 10.0 if tool == PI_LORA else 20.0
        Path(env["PEER_TIMER_OUT"]).write_text("".join(
            json.dumps(r) + "\n" for r in _records([cpu] * 7, tcmalloc="LD_PRELOAD" in env)))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench_peers.subprocess, "run", fake_run)
    out = tmp_path / "results.json"
    assert bench_peers.main(["--lengths", "512", "--peers", "axolotl,plain", "--work",
                             str(tmp_path / "work"), "--json-out", str(out)]) == 0
    assert {p for tool, p in seen} == {str(library), None} and len(seen) == 2 * 2 * 2 * 2
    document, results = report.load(out)
    assert [w["order"] for w in document["waves"]][:2] == [[PI_LORA, "axolotl"], [PI_LORA, "plain"]]
    assert document["conditions"]["allocators"]["tcmalloc"] == str(library)
    assert document["conditions"]["threads"] == 1 and document["conditions"]["timed_steps"] == 6
    assert all(r.ok and len(r.load_start) == 3 and len(r.step_cpu_s) == 6 for r in results)
    text = report.render(document, results)
    assert "Ratios measured within waves" in text and "glibc: CPU s/step" in text
    assert "| 512 | tcmalloc | defaults | axolotl | 2 (1) | 0.50 (0.50-0.50) | 1.00 (1.00-1.00) |" in text
