"""The run report: tables show what metrics.json holds, in the units their headers name."""
import json

from unirobust.report import write_report


def test_training_table_shows_every_accuracy_in_percent(tmp_path):
    ev = {"n": 4, "seconds": 1.0, "clean_accuracy": 0.75, "robust_accuracy": 0.25, "cascade": [],
          "per_class": {"a": {"n": 2, "clean_accuracy": 1.0, "robust_accuracy": 0.5},
                        "b": {"n": 2, "clean_accuracy": 0.5, "robust_accuracy": 0.0}}}
    history = [{"epoch": 0, "step": 10, "loss": 0.5, "train_accuracy": 0.8125,
                "monitor_pgd_accuracy": 0.375, "monitor_fgsm_accuracy": 0.5, "clean_correct": 7.0}]
    metrics = {"eval": ev, "train": {"history": history, "steps": 10, "seconds": 2.0}}
    write_report(tmp_path, "r", metrics)
    report = (tmp_path / "report.md").read_text()
    table = report.split("## Training")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in table[2].strip("|").split("|"))))
    assert row["train accuracy %"] == "81.2"
    assert row["monitor pgd accuracy %"] == "37.5" and row["monitor fgsm accuracy %"] == "50.0"
    assert row["clean correct"] == "7"  # a count stays a count
    assert json.loads((tmp_path / "metrics.json").read_text())["train"]["history"] == history


def test_study_table_has_a_column_per_word_attack():
    """A study comparing defenses shows each word attack's accuracy beside the cascade ("—" for a
    run that did not run it, e.g. a vision variant)."""
    from unirobust.report import metrics_table

    text = {"n": 32, "clean_accuracy": 0.75, "robust_accuracy": 0.5, "cascade": [],
            "word_attacks": {"pwws(n=8)": {"accuracy_under_attack": 0.125}}}
    vision = {"n": 96, "clean_accuracy": 0.9, "robust_accuracy": 0.4, "cascade": []}
    lines = metrics_table({"s/text": text, "s/vision": vision}, {"s/text": "sst2", "s/vision": "digits"}).splitlines()
    assert lines[0].split("|")[-2].strip() == "pwws(n=8) %"
    assert lines[2].split("|")[-2].strip() == "12.5" and lines[3].split("|")[-2].strip() == "—"
    assert "pwws" not in metrics_table({"s/text": text})  # a single run's report has its own word table
