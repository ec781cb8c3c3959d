"""benchmarks/device_run.py: the README's combined tables and verdicts from saved results, and its
usage errors (no measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

dr = pytest.importorskip("device_run")


def _row(pred, meas, drift_err):
    return {"bpw": 4.6, "pred_tg_ts": pred, "tg_ts": meas, "tg_err": pred / meas - 1, "pred_pp_ts": 10 * pred,
            "pp_ts": 10 * pred, "pp_err": 0.0, "reference": {"label": "uniform Q4_0"}, "tg_err_drift": drift_err,
            "pp_err_drift": 0.0}


def _win(tg_ratio, pp_ratio, dkld, ci, passes=None):
    """A win entry; ``passes``: the plan's per-pass tg ratios to the mix (pp the same), else one pass."""
    base = {"bpw": 5.0, "tg_ts": 100.0, "pp_ts": 1000.0, "tg_ratio": 1.0, "pp_ratio": 1.0, "task_kld": 0.2, "task_kld_se": 0.01}
    aware = {**base, "tg_ts": 100 * tg_ratio, "pp_ts": 1000 * pp_ratio, "tg_ratio": tg_ratio, "pp_ratio": pp_ratio,
             "dkld_vs_llama": dkld, "dkld_vs_llama_ci95": ci, "dkld_vs_blind": 0.01, "dkld_vs_blind_ci95": 0.005}
    if passes:
        mix = [100.0, 130.0, 90.0, 110.0][:len(passes)]          # the machine's speed moves from pass to pass
        aware["mix_now"] = {"round_tg": mix, "round_pp": [10 * x for x in mix]}
        aware["raw"] = {"round_tg": [r * x for r, x in zip(passes, mix)], "round_pp": [10 * r * x for r, x in zip(passes, mix)]}
    return {"goal": 0.98, "rows": {"llama.cpp": base, "TASA speed-aware": aware}}


def test_combined_tables_count_what_is_within_10_percent_and_where_the_win_is_met(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({
        "rows": {"TASA 4.6 bpw": _row(100.0, 105.0, 0.02), "TASA 5.5 bpw": _row(100.0, 85.0, 0.12)},
        "win": {"Q3_K_S": _win(1.01, 0.99, -0.05, 0.01), "Q3_K_M": _win(1.01, 0.97, -0.05, 0.01),
                "Q2_K": _win(1.2, 1.2, -0.005, 0.01)}}))
    text = dr.combined(tmp_path, ["a"])
    # 4 numbers: tg -4.8% and +17.6%, pp 0% twice -> 3 within 10%
    assert "Raw: 3 of 4 numbers within 10% (max |error| 17.6%)" in text
    assert "max |error| 12.0%" in text                              # with the drift out
    # one pass each (point ratios): Q3_K_M misses the prefill goal; Q2_K is fast enough but its task
    # KLD is not significantly lower (nor higher)
    assert ("met at 1 of 3 budgets (a Q3_K_S); inconclusive at 1 of 3 budgets (a Q2_K); "
            "not met at 1 of 3 budgets (a Q3_K_M).") in text
    assert "-0.0500 ± 0.0100 tok" in text and "Task-KLD intervals marked `tok`" in text     # recorded over tokens


def test_win_verdict_reads_the_interval_of_the_paired_passes(tmp_path):
    # point ratios above the goal, but passes that scatter around it: inconclusive; steady passes
    # above it: met; steady passes below it: not met
    (tmp_path / "a.json").write_text(json.dumps({"rows": {}, "win": {
        "Q3_K_S": _win(1.0, 1.0, -0.05, 0.01, passes=[1.06, 0.93, 1.05, 0.94]),
        "Q3_K_M": _win(1.01, 1.01, -0.05, 0.01, passes=[1.01, 1.012, 1.008, 1.01]),
        "Q4_K_S": _win(0.97, 0.97, -0.05, 0.01, passes=[0.97, 0.972, 0.968, 0.97])}}))
    text = dr.combined(tmp_path, ["a"])
    assert "No prediction checks saved." in text
    assert ("met at 1 of 3 budgets (a Q3_K_M); inconclusive at 1 of 3 budgets (a Q3_K_S); "
            "not met at 1 of 3 budgets (a Q4_K_S).") in text
    row = next(ln for ln in text.splitlines() if "| a | Q3_K_S | TASA speed-aware |" in ln)
    lo, hi = (float(x) for x in row.split("95% ")[1].split(")")[0].split("-"))
    assert lo < 0.98 < 1.0 < hi


def test_summary_only_without_results_is_a_usage_error(tmp_path):
    out = tmp_path / "none"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_run.py"), "--summary-only", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no saved results to summarise" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_run.py"), "--summary-only", "--analysis", "x"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "MODEL=PATH" in p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_run.py"), "--check-answers", "-1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--check-answers must be at least 0" in p.stderr and not out.exists()
    # device_plans refuses a check that cannot re-plan nearer the mix before it opens anything
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_plans.py"), "--model", "x", "--profile", "x",
                        "--analysis", "x", "--check-answers", "8", "--replan", "own-ratio"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not own-ratio" in p.stderr and "Traceback" not in p.stderr
    # an interval over answers needs two of them; a negative count sliced the answers from the end
    for script, extra in (("device_run.py", ["--out", str(out)]), ("device_plans.py", ["--model", "x", "--profile", "x", "--analysis", "x"])):
        for n in ("1", "-3"):
            p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *extra, "--n-eval", n],
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 2 and "--n-eval must be at least 2" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_summary_names_the_run_of_each_model(tmp_path):
    """run.json keeps one header per model: models measured by different runs are labelled so, and
    a run.json from before per-model headers still labels the models it names."""
    for m in ("m1", "m2", "m3"):
        (tmp_path / f"{m}.json").write_text(json.dumps({"rows": {"TASA 4.6 bpw": _row(100.0, 101.0, 0.01)}}))
        (tmp_path / f"{m}.md").write_text(f"{m} tables\n")
        (tmp_path / f"{m}.profile.toml").write_text(f'[measured]\ncreated = "2026-12-05T1{m[1]}:00:00Z"\n')
    (tmp_path / "run.json").write_text(json.dumps({"header": "old run", "models": ["m1", "m2"]}))
    assert dr.run_headers(tmp_path) == {"m1": "old run", "m2": "old run"}
    dr.write_summary(tmp_path, ["m1", "m2", "m3"], {**dr.run_headers(tmp_path), "m2": "new run"})
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# Device-aware plans: 3 runs")
    assert "- m1: old run" in text and "- m2: new run" in text and "- m3: A run that did not reach its end" in text
    assert "Profile measured 2026-12-05T13:00:00Z" in text and "m3 tables" in text
    dr.write_summary(tmp_path, ["m1"], {"m1": "old run"})
    assert (tmp_path / "summary.md").read_text().startswith("# Device-aware plans: one run\n\n- m1: old run\n")


def test_each_model_is_labelled_when_it_is_done_so_a_stopped_run_keeps_them(tmp_path, monkeypatch):
    """A run stopped on its last model still names the run that made the models it finished; a
    resumed run labels what it measured and leaves a model it found complete under its own run."""
    out = tmp_path / "device"
    stop_at = {"qwen2.5-coder-1.5b"}

    def fake_run(cmd, progress=False):  # the profile, the analysis and device_plans, made of files
        if cmd[:2] == ["tasa-edge", "profile"]:
            assert progress                 # its per-file lines show in the run's log
            Path(cmd[cmd.index("-o") + 1]).write_text('[measured]\ncreated = "2026-12-06T02:00:00Z"\n')
        elif cmd[:2] == ["tasa-edge", "analyze"]:
            d = Path(cmd[cmd.index("-o") + 1])
            d.mkdir(parents=True)
            (d / "analysis.json").write_text("{}")
        else:
            m = cmd[cmd.index("--model") + 1]
            if m in stop_at:
                raise SystemExit("stopped")
            if not (out / f"{m}.json").is_file():      # device_plans resumes: nothing to measure again
                (out / f"{m}.json").write_text(json.dumps({"rows": {"TASA 4.6 bpw": _row(100.0, 101.0, 0.01)}}))
                (out / f"{m}.md").write_text(f"{m} tables\n")

    monkeypatch.setattr(dr, "run", fake_run)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"runs": {"smollm2-135m": "an older run"}}))
    with pytest.raises(SystemExit):
        dr.main(["--out", str(out), "--fresh"])
    first = dr.run_headers(out)
    assert sorted(first) == ["gemma3-270m", "smollm2-135m"]
    assert len(set(first.values())) == 1                  # one run, each model with its own times
    assert first["smollm2-135m"].startswith("`python benchmarks/device_run.py --out ") and "--fresh` at commit" in first["smollm2-135m"]
    assert sorted(dr.run_times(out)) == ["gemma3-270m", "smollm2-135m"]
    stop_at.clear()
    assert dr.main(["--out", str(out), "--note", "Resumes the run above."]) == 0
    second = dr.run_headers(out)
    assert {m: second[m] for m in first} == first
    assert second["qwen2.5-coder-1.5b"].endswith("Resumes the run above.") and "--fresh" not in second["qwen2.5-coder-1.5b"]
    text = (out / "summary.md").read_text()
    assert text.startswith("# Device-aware plans: 2 runs")
    assert f"- smollm2-135m ({dr.run_times(out)['smollm2-135m']}), gemma3-270m (" in text


def test_a_step_shows_its_progress_only_when_asked(capfd, monkeypatch):
    """device_plans, imported here, turns progress off for this process (TASA_NO_PROGRESS), and the
    children inherit it: the profile's 49-minute step on Qwen printed nothing until its end."""
    monkeypatch.setenv("TASA_NO_PROGRESS", "1")
    show = [sys.executable, "-c", "import os; print('progress off' if os.environ.get('TASA_NO_PROGRESS') else 'progress on')"]
    dr.run(show)
    dr.run(show, progress=True)
    out = capfd.readouterr().out
    assert out.index("progress off") < out.index("progress on")


def test_a_model_profiled_again_loses_its_old_profile_so_a_stopped_run_resumes_the_new_one(tmp_path, monkeypatch):
    """``--reprofile``: a run stopped inside the new profile must not, resumed, plan with the old one."""
    out = tmp_path / "device"
    out.mkdir()
    m = "smollm2-135m"
    (out / f"{m}.profile.toml").write_text('[measured]\ncreated = "2026-12-01T00:00:00Z"\n')
    (out / f"{m}.profile-progress.json").write_text("{}")
    calls, resumed = [], False

    def stop_in_profile(cmd, progress=False):
        calls.append(cmd[:2])
        if cmd[:2] == ["tasa-edge", "profile"]:
            assert not (out / f"{m}.profile.toml").exists()
            progress_file = out / f"{m}.profile-progress.json"
            assert cmd[cmd.index("--resume") + 1] == str(progress_file)
            assert progress_file.read_text() == ('{"half": true}' if resumed else "") if progress_file.exists() else not resumed
            progress_file.write_text('{"half": true}')     # what it measured so far
            raise SystemExit("stopped")

    monkeypatch.setattr(dr, "run", stop_in_profile)
    with pytest.raises(SystemExit):
        dr.main(["--out", str(out), "--models", m, "--reprofile", m])
    calls.clear()
    resumed = True
    with pytest.raises(SystemExit):             # resumed without --reprofile: the profile is made (resumed), not skipped
        dr.main(["--out", str(out), "--models", m])
    assert calls == [["tasa-edge", "profile"]]
    assert (out / f"{m}.profile-progress.json").read_text() == '{"half": true}'


def test_the_verdict_line_names_a_corrected_proxy_and_a_task_kld_not_shown_different():
    import device_plans as dp

    w = _win(1.01, 1.01, -0.001, 0.01)
    w["rows"]["TASA speed-aware"]["tries"] = [
        {"limits_ms": {}, "margin": 0.05, "skipped": "predicted loss 2.4 >= the mix's 1.5"},
        {"limits_ms": {}, "margin": 0.025, "calibration": {"scales": {"ffn_down down": 1.64, "token_embd up": 0.1}}},
        {"limits_ms": {}, "margin": 0.025, "skipped": "the corrected scores plan the same tensors"}]
    text = dp.win_table({"win": {"Q3_K_M": w}})
    assert ("(speed margin 0.025, 1 plan(s) predicted no better than the mix not measured, loss proxy corrected after "
            "2 groups of moves measured alone: ffn_down down x1.64, token_embd up x0.10, plan 1 of at most 1)") in text
    assert "task KLD not significantly different from the mix's: inconclusive" in text


def test_the_tables_name_how_many_answers_each_budgets_task_kld_is_over(tmp_path):
    """Models measured with different --n-eval (Qwen's win over 40 answers, the small models' over
    20): the combined table names each count with its budgets, a model's own table its count(s)."""
    import device_plans as dp

    small, big = _win(1.01, 0.99, -0.05, 0.01), _win(1.01, 1.01, -0.02, 0.01)
    small["n_eval"], big["n_eval"] = 20, 40
    (tmp_path / "a.json").write_text(json.dumps({"rows": {}, "win": {"Q3_K_S": small}}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": {}, "win": {"Q3_K_S": big, "Q3_K_M": big}}))
    text = dr.combined(tmp_path, ["a", "b"])
    assert ("Task KLD over the first held-out GSM8K answers of the eval split: 20 at a Q3_K_S; "
            "40 at b Q3_K_S, b Q3_K_M.") in text
    assert "- task KLD over the first 20/40 held-out GSM8K answers" in dp.win_table({"win": {"Q3_K_S": small, "Q3_K_M": big}})
    del small["n_eval"]             # recorded before the field: no line
    (tmp_path / "a.json").write_text(json.dumps({"rows": {}, "win": {"Q3_K_S": small}}))
    assert "Task KLD over" not in dr.combined(tmp_path, ["a"])
