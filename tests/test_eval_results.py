"""Results dir (settings guard, resume after a crash, summary), table, and run comparison."""

import json
import math

import pytest

from s2t_edge.errors import S2TError
from s2t_edge.eval.compare import compare_runs, plot_compare
from s2t_edge.eval.results import ResultsDir, RunSettings, format_table, summarize, wilson

SETTINGS = {
    "model_sha256": "ab" * 32,
    "policy": "greedy",
    "k": 1,
    "max_tokens": 512,
    "data": "gsm8k-test.jsonl",
    "bundle": None,
    "seed": 0,
}


def _rec(i, correct, tokens=100, seconds=2.0, triggers=0, flips=0, policy="greedy"):
    return {
        "id": f"p{i}",
        "policy": policy,
        "output": "...",
        "pred": "1",
        "gold": "1",
        "correct": correct,
        "tokens": tokens,
        "seconds": seconds,
        "triggers": triggers,
        "flips": flips,
    }


def _run(path, settings, records):
    rd = ResultsDir(path, settings)
    for r in records:
        rd.append(r)
    return rd


def test_settings_written_and_reopened(tmp_path):
    rd = ResultsDir(tmp_path / "out", SETTINGS)
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == SETTINGS
    rd.append(_rec(0, True))
    with pytest.raises(S2TError, match="in use by another run"):  # two runs never write into one folder
        ResultsDir(tmp_path / "out", dict(SETTINGS))
    rd.close()
    again = ResultsDir(tmp_path / "out", dict(SETTINGS))  # same settings: fine, resumes
    assert again.done_ids() == {"p0"}


def test_results_without_settings_are_not_adopted(tmp_path):
    rd = ResultsDir(tmp_path / "out", SETTINGS)
    rd.append(_rec(0, True))
    rd.close()
    (tmp_path / "out" / "settings.json").unlink()
    with pytest.raises(S2TError, match="holds results but no settings.json"):
        ResultsDir(tmp_path / "out", SETTINGS)


def test_settings_mismatch_refused(tmp_path):
    ResultsDir(tmp_path / "out", SETTINGS)
    other = {**SETTINGS, "policy": "s2t-local", "k": 4}
    with pytest.raises(S2TError) as e:
        ResultsDir(tmp_path / "out", other)
    msg = str(e.value)
    assert msg.startswith("out dir holds results from different settings: ")
    assert "policy 'greedy' != 's2t-local'" in msg and "k 1 != 4" in msg
    assert "model_sha256" not in msg and msg.endswith("; use another --out")
    # an added key is reported too, and settings.json is left untouched
    with pytest.raises(S2TError, match="temperature <unset> != 0.7"):
        ResultsDir(tmp_path / "out", {**SETTINGS, "temperature": 0.7})
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == SETTINGS


def test_run_settings_is_read_only_and_json_normalised():
    s = RunSettings({"k": 4, "layers": (1, 2)})
    assert s["layers"] == [1, 2] and dict(s) == {"k": 4, "layers": [1, 2]}
    with pytest.raises(TypeError):
        s["k"] = 5  # type: ignore[index]
    with pytest.raises(S2TError, match="not JSON-able"):
        RunSettings({"f": object()})


def test_resume_with_truncated_last_line(tmp_path):
    rd = _run(tmp_path / "out", SETTINGS, [_rec(0, True), _rec(1, False)])
    results = tmp_path / "out" / "results.jsonl"
    good = results.read_bytes()
    results.write_bytes(good + b'{"id": "p2", "policy": "gre')  # crash mid-write
    assert rd.done_ids() == {"p0", "p1"}
    assert results.read_bytes() == good  # cut back to the last complete line
    # a fresh open after the crash appends cleanly
    results.write_bytes(good + b'{"id": "p2"')
    rd.close()
    rd2 = ResultsDir(tmp_path / "out", SETTINGS)
    rd2.append(_rec(2, True))
    lines = results.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["p0", "p1", "p2"]
    assert rd2.done_ids() == {"p0", "p1", "p2"}


def test_unterminated_but_complete_last_line_is_kept(tmp_path):
    rd = _run(tmp_path / "out", SETTINGS, [_rec(0, True)])
    results = tmp_path / "out" / "results.jsonl"
    results.write_bytes(results.read_bytes() + json.dumps(_rec(1, True)).encode())
    assert rd.done_ids() == {"p0", "p1"}
    rd.append(_rec(2, True))
    assert len(results.read_text().splitlines()) == 3


def test_corrupt_middle_line_is_an_error(tmp_path):
    rd = _run(tmp_path / "out", SETTINGS, [_rec(0, True)])
    results = tmp_path / "out" / "results.jsonl"
    results.write_text(results.read_text() + "garbage\n" + json.dumps(_rec(1, True)) + "\n")
    with pytest.raises(S2TError, match=r"results\.jsonl:2: corrupt result line"):
        rd.done_ids()


def test_summary_numbers_on_hand_built_set(tmp_path):
    recs = [
        _rec(0, True, tokens=100, seconds=2.0, triggers=10, flips=2),
        _rec(1, True, tokens=200, seconds=3.0, triggers=20, flips=3),
        _rec(2, False, tokens=300, seconds=5.0, triggers=0, flips=0),
        _rec(3, True, tokens=400, seconds=10.0, triggers=30, flips=5),
    ]
    rd = _run(tmp_path / "out", SETTINGS, recs)
    s = rd.summary()
    assert s["policy"] == "greedy" and s["n"] == 4 and s["correct"] == 3
    assert s["accuracy"] == 0.75
    assert s["mean_tokens"] == 250
    assert s["tokens_per_s"] == pytest.approx(1000 / 20)
    assert s["wall_seconds"] == 20 and s["s_per_problem"] == 5
    assert s["trigger_rate"] == pytest.approx(60 / 1000)
    assert s["flip_rate"] == pytest.approx(10 / 1000)
    # Wilson 95% for 3/4, computed by hand
    z = 1.959963984540054
    c = (0.75 + z * z / 8) / (1 + z * z / 4)
    h = z * math.sqrt(0.75 * 0.25 / 4 + z * z / 64) / (1 + z * z / 4)
    assert (s["ci_lo"], s["ci_hi"]) == (pytest.approx(c - h), pytest.approx(c + h))
    assert s["ci_lo"] == pytest.approx(0.3006, abs=1e-4)
    assert s["ci_hi"] == pytest.approx(0.9544, abs=1e-4)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == s


def test_summary_of_empty_run_and_duplicates():
    s = summarize([])
    assert s["n"] == 0 and s["accuracy"] is None and s["tokens_per_s"] is None
    assert wilson(0, 0) == (0.0, 1.0)
    s = summarize([_rec(0, True), _rec(0, False), _rec(1, False)])
    assert s["n"] == 2 and s["correct"] == 1  # first record of a duplicated id counts


def test_format_table_aligned_with_cost_relative_to_greedy():
    rows = [
        {**summarize([_rec(0, True, seconds=2.0), _rec(1, False, seconds=2.0)]), "policy": "greedy"},
        {**summarize([_rec(0, True, seconds=5.0, triggers=5), _rec(1, True, seconds=5.0)]), "policy": "s2t-local"},
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(x) for x in lines[:2]}) == 1
    for col in ("policy", "n", "accuracy", "mean tokens", "tok/s", "s/problem", "trigger rate", "flip rate", "cost×"):
        assert col in lines[0]
    greedy, s2t = lines[2].split(), lines[3].split()
    assert greedy[0] == "greedy" and greedy[-1] == "1.00×" and "50.0%" in lines[2]
    assert s2t[0] == "s2t-local" and s2t[-1] == "2.50×" and "100.0%" in lines[3]
    assert lines[2].index("1.00×") == lines[3].index("2.50×")  # right-aligned column
    assert "0.0250" in lines[3]  # trigger rate 5 / 200
    no_greedy = format_table(rows[1:]).splitlines()[2]
    assert no_greedy.endswith("-")


def test_compare_restricts_to_common_ids(tmp_path):
    _run(tmp_path / "g", SETTINGS, [_rec(i, i < 2, seconds=1.0) for i in range(4)])
    _run(
        tmp_path / "s",
        {**SETTINGS, "policy": "s2t-local"},
        [_rec(i, True, seconds=3.0, policy="s2t-local") for i in range(1, 6)],
    )
    rows = compare_runs([tmp_path / "g", tmp_path / "s"])
    assert [r["policy"] for r in rows] == ["greedy", "s2t-local"]
    assert all(r["n"] == 3 and r["n_common"] == 3 for r in rows)  # ids p1..p3
    assert [r["n_total"] for r in rows] == [4, 5]
    assert rows[0]["correct"] == 1 and rows[1]["correct"] == 3
    assert rows[0]["s_per_problem"] == 1.0 and rows[1]["s_per_problem"] == 3.0
    assert "3.00×" in format_table(rows)
    first = compare_runs([tmp_path / "g", tmp_path / "s"], only={"p0", "p1", "p2"})  # e.g. the first N
    assert all(r["n"] == 2 and r["n_common"] == 2 for r in first)  # p1, p2: p0 is not in both
    with pytest.raises(S2TError, match="none of the problems"):
        compare_runs([tmp_path / "g", tmp_path / "s"], only={"p0", "p9"})


def test_compare_errors(tmp_path):
    _run(tmp_path / "a", SETTINGS, [_rec(0, True)])
    _run(tmp_path / "b", SETTINGS, [_rec(1, True)])
    with pytest.raises(S2TError, match="share no problem ids"):
        compare_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(S2TError, match="not a results dir"):
        compare_runs([tmp_path / "a", tmp_path / "missing"])
    _run(tmp_path / "a2", {**SETTINGS, "seed": 1}, [_rec(0, False)])
    rows = compare_runs([tmp_path / "a", tmp_path / "a2"])  # same policy twice: labels differ
    assert [r["label"] for r in rows] == ["greedy (a)", "greedy (a2)"]
    with pytest.raises(S2TError, match="at least one"):
        compare_runs([])


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path / "g", SETTINGS, [_rec(i, i % 2 == 0) for i in range(6)])
    _run(
        tmp_path / "s",
        {**SETTINGS, "policy": "s2t-local"},
        [_rec(i, True, seconds=4.0, policy="s2t-local") for i in range(6)],
    )
    out = plot_compare(compare_runs([tmp_path / "g", tmp_path / "s"]), tmp_path / "p" / "c.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(S2TError, match="plotting needs matplotlib: pip install matplotlib"):
        plot_compare([{"policy": "greedy", "accuracy": 0.5, "s_per_problem": 1.0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_compare_pairs_each_policy_with_greedy(tmp_path):
    """+/- counts are per problem on the common ids; p is the exact two-sided McNemar value."""
    from s2t_edge.eval.compare import mcnemar_exact

    _run(tmp_path / "g", SETTINGS, [_rec(i, i in (0, 1, 2)) for i in range(8)])
    _run(
        tmp_path / "s",
        {**SETTINGS, "policy": "s2t-local"},
        [_rec(i, i in (2, 3, 4, 5, 6), policy="s2t-local") for i in range(8)],
    )
    g, s = compare_runs([tmp_path / "g", tmp_path / "s"])
    assert "wins_vs_greedy" not in g
    assert (s["wins_vs_greedy"], s["losses_vs_greedy"]) == (4, 2)  # solved 3,4,5,6 / lost 0,1
    assert s["p_vs_greedy"] == pytest.approx(2 * (1 + 6 + 15) / 64)  # 2 * P(X <= 2), X ~ Bin(6, 1/2)
    table = format_table([g, s])
    assert "vs greedy" in table and "+4/-2, p=0.69" in table
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == 1.0


def test_compare_blanks_cost_across_batch_modes(tmp_path):
    """A batched run's seconds are a share of the batch: its cost is not set against a lone decode."""
    _run(tmp_path / "g", SETTINGS, [_rec(i, True, seconds=2.0) for i in range(3)])
    maj = [_rec(i, True, seconds=6.0, policy="maj@8") for i in range(3)]
    _run(tmp_path / "m", {**SETTINGS, "policy": "maj@8"}, maj)
    _run(
        tmp_path / "b",
        {**SETTINGS, "policy": "s2t-local", "batch": 16},
        [_rec(i, True, seconds=1.0, policy="s2t-local") for i in range(3)],
    )
    lines = format_table(compare_runs([tmp_path / "g", tmp_path / "m", tmp_path / "b"])).splitlines()
    assert "3.00×" in lines[3] and "×" not in lines[4]  # maj@8 vs greedy, both unbatched; s2t-local blank
    assert "another --batch" in lines[-1]
    same = format_table(compare_runs([tmp_path / "g", tmp_path / "m"]))
    assert "another --batch" not in same


def test_lock_folder_is_exclusive_and_released(tmp_path):
    from s2t_edge.locks import lock_folder

    held = lock_folder(tmp_path)
    with pytest.raises(S2TError, match="in use by another run"):
        lock_folder(tmp_path)
    held.close()
    with lock_folder(tmp_path):  # released: another run may take it
        pass
