import subprocess
import sys

import pytest

from fedtune.cli import main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["simulate", "--preset", "nope"], "unknown preset 'nope'"),
        (["simulate", "--set", "lora-rank=-3"], "lora-rank=-3"),
        (["simulate", "--set", "lora-alpha=1e9"], "lora-alpha"),
        (["simulate", "--set", "fraction-train=1.5"], "fraction-train=1.5"),
        (["simulate", "--set", "colour=blue"], "unknown config key 'colour'"),
        (["simulate", "--set", "model=/no/such/model", "--set", "rounds=1"], "model path not found: /no/such/model"),
        (["simulate", "--config", "/no/such.toml"], "config file not found"),
        (["report", "/no/such/run"], "not a run directory"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path):
    if argv[0] == "simulate":
        argv = argv + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err


def test_console_script_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "fedtune", "simulate", "--set", "rounds=0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "rounds=0" in r.stderr


def test_report_writes_plots_and_html(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"strategy": "fedavg", "model": "tiny"}))
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 3 - r, "bytes_up": 10, "bytes_down": 20, "seconds": 1.0} for r in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    for f in ("accuracy.png", "loss.png", "bytes.png", "report.html"):
        assert (run / f).stat().st_size > 500
    assert "0.2000" in (run / "report.html").read_text()


def test_report_plots_the_accountant_and_the_audit(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"strategy": "fedavg", "model": "tiny"}))
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 3 - r, "bytes_up": 10, "bytes_down": 20, "seconds": 1.0,
             "epsilon": 1.5 * r} for r in range(3)]
    rows[-1].update(epsilon_audit=1.2, epsilon_audit_low=0.8, epsilon_audit_high=1.9)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    assert (run / "privacy.png").stat().st_size > 500 and 'src="privacy.png"' in (run / "report.html").read_text()
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "epsilon" not in k}) + "\n"
                                               for r in rows))
    (run / "privacy.png").unlink()
    assert main(["report", str(run)]) == 0 and not (run / "privacy.png").exists()
