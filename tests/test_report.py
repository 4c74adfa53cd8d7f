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


def row_of(table: str, line: int) -> dict:
    rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table.strip().splitlines()]
    return dict(zip(rows[0], rows[line]))


def test_no_robust_figure_without_a_continuous_attack(tmp_path):
    """Without a continuous attack robust_accuracy equals clean accuracy: the tables show "—" and the
    plot no robust bar, not a robustness nobody measured (word attacks have their own table)."""
    from unirobust.report import metrics_table

    per_class = {"a": {"n": 2, "clean_accuracy": 1.0, "robust_accuracy": 1.0},
                 "b": {"n": 2, "clean_accuracy": 0.5, "robust_accuracy": 0.5}}
    plain = {"n": 4, "seconds": 1.0, "clean_accuracy": 0.75, "robust_accuracy": 0.75, "worst_class_robust_accuracy": 0.5,
             "cascade": [], "per_class": per_class}
    attacked = {**plain, "robust_accuracy": 0.25, "worst_class_robust_accuracy": 0.0,
                "cascade": [{"attack": "pgd", "robust_accuracy": 0.25}]}
    table = metrics_table({"plain": plain, "attacked": attacked})
    assert row_of(table, 2)["robust %"] == "—" and row_of(table, 2)["worst class robust %"] == "—"
    assert row_of(table, 2)["clean %"] == "75.0"
    assert row_of(table, 3)["robust %"] == "25.0" and row_of(table, 3)["worst class robust %"] == "0.0"
    write_report(tmp_path, "plain", {"eval": plain})
    per_class_table = (tmp_path / "report.md").read_text().split("## Per class")[1].split("\n\n")[1]
    assert row_of(per_class_table, 2)["robust %"] == "—" and row_of(per_class_table, 2)["clean %"] == "100.0"


def test_plot_draws_no_robust_bar_where_no_attack_ran(tmp_path, monkeypatch):
    import matplotlib.axes

    from unirobust.report import plot_clean_robust

    heights = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        heights.append(list(height))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    bars = {"plain": {"clean_accuracy": 0.9, "robust_accuracy": 0.9, "cascade": []},
            "pgd-at": {"clean_accuracy": 0.8, "robust_accuracy": 0.4, "cascade": [{"attack": "pgd"}]}}
    assert plot_clean_robust(tmp_path / "s.png", "s", bars) and (tmp_path / "s.png").exists()
    clean, robust = heights
    assert clean == [0.9, 0.8] and robust[1] == 0.4 and robust[0] != robust[0]  # NaN: no bar


def test_a_one_class_model_is_flagged_not_ranked_robust(tmp_path):
    """A model that gives every example one class scores that class's share as 'robust' accuracy: the
    evaluation says so, and a study table marks the row; a dataset that is itself one-sided is not flagged."""
    import torch

    from unirobust.evaluate import evaluate, one_class_warning
    from unirobust.report import metrics_table
    from unirobust.train import make_accelerator

    labels = torch.arange(40) % 2
    warning = one_class_warning(torch.ones(40, dtype=torch.long), labels, ["negative", "positive"])
    assert "predicts 'positive' for 40 of 40 clean examples (100%; the class is 50% of them)" in warning
    assert one_class_warning(labels.clone(), labels) is None                       # both classes predicted
    assert one_class_warning(torch.ones(40, dtype=torch.long), torch.ones(40, dtype=torch.long)) is None
    assert one_class_warning(torch.ones(10, dtype=torch.long), torch.arange(10) % 2) is None  # too few to tell

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0]).expand(len(x), 2)

    from unirobust.models.vision import VisionAdapter

    data = [{"image": torch.rand(1, 4, 4).numpy(), "label": i % 2} for i in range(40)]
    ev = evaluate(VisionAdapter(Constant(), 2), data, {}, make_accelerator(), batch_size=16, class_names=["a", "b"],
                  check_examples=0)
    assert "predicts 'b' for 40 of 40" in ev["prediction_warning"]
    from unirobust.tasks import ThreatModel

    class AlwaysB(torch.nn.Module):  # differentiable, and class b whatever the image
        def forward(self, x):
            s = 10 + x.mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(s), s], -1)

    checked = evaluate(VisionAdapter(AlwaysB(), 2), data, {}, make_accelerator(), batch_size=16,
                       threat=ThreatModel(eps=0.1), check_examples=16)
    # its flat accuracy-vs-eps curve is the one class, not masked gradients: the checks say so first
    assert len(checked["warnings"]) >= 2 and "eps monotonicity" in checked["warnings"][1]
    assert checked["warnings"][0].startswith("the model gives one class to almost every example")
    assert "| run ⚠ |" in metrics_table({"run": ev})
    write_report(tmp_path, "run", {"eval": ev})
    assert "**⚠ Predictions:** the model predicts 'b'" in (tmp_path / "report.md").read_text()


def test_study_summary_marks_one_class_runs_in_the_plot_and_says_when_attacks_differ(tmp_path, monkeypatch):
    from unirobust import report

    def run(clean, robust, attack, warning=None):
        ev = {"n": 10, "clean_accuracy": clean, "robust_accuracy": robust, "worst_class_robust_accuracy": robust,
              "cascade": [{"attack": attack, "robust_accuracy": robust}], "per_class": {}}
        return {**ev, "prediction_warning": warning} if warning else ev

    plotted = {}
    monkeypatch.setattr(report, "plot_clean_robust", lambda path, title, bars: plotted.update(bars) or True)
    results = {"s/a": run(0.9, 0.3, "pgd(steps=10)"), "s/b": run(0.5, 0.5, "pgd(steps=5)", "predicts 'pos' for 100%")}
    summary = report.write_summary(tmp_path, results, {"s/a": "digits", "s/b": "digits"}).read_text()
    assert list(plotted) == ["a (digits)", "b (digits) ⚠"]
    assert "which differ between these runs" in summary
    same = {"s/a": run(0.9, 0.3, "pgd(steps=10)"), "s/b": run(0.8, 0.4, "pgd(steps=10)")}
    assert "which differ" not in report.write_summary(tmp_path, same, {"s/a": "digits", "s/b": "digits"}).read_text()
    # the same title, other budgets (the task's eps, filled in): attacked differently too
    small, large = run(0.9, 0.3, "pgd(steps=10)"), run(0.8, 0.4, "pgd(steps=10)")
    small["attacks"] = {"pgd(steps=10)": {"eps": 0.05, "norm": "linf"}}
    large["attacks"] = {"pgd(steps=10)": {"eps": 0.1, "norm": "linf"}}
    text = report.write_summary(tmp_path, {"s/a": small, "s/b": large}, {"s/a": "digits", "s/b": "digits"}).read_text()
    assert "which differ between these runs" in text


def test_report_gives_the_checks_time_and_says_when_they_were_off(tmp_path):
    ev = {"n": 4, "seconds": 1.0, "clean_accuracy": 0.75, "robust_accuracy": 0.25, "cascade": [
        {"attack": "pgd", "robust_accuracy": 0.25}], "per_class": {}, "warnings": [], "checks_seconds": 118.0}
    write_report(tmp_path, "r", {"eval": ev})
    text = (tmp_path / "report.md").read_text()
    assert "in 1.0 s. The gradient-masking checks took 118.0 s more." in text and "No warnings" in text
    off = {k: v for k, v in ev.items() if k not in ("warnings", "checks_seconds")}
    write_report(tmp_path, "r", {"eval": {**off, "checks_off": True}})
    assert "Not run (`eval.check_examples: 0`)" in (tmp_path / "report.md").read_text()


def test_tables_name_each_attack_budget_and_mark_gradient_masking_warnings(tmp_path):
    from unirobust.report import cautions, metrics_table

    ev = {"n": 10, "clean_accuracy": 0.9, "robust_accuracy": 0.8, "worst_class_robust_accuracy": 0.7,
          "cascade": [{"attack": "pgd(steps=10)", "robust_accuracy": 0.8}],
          "attacks": {"pgd(steps=10)": {"eps": 0.05, "norm": "l2", "relative": True, "steps": 10}},
          "warnings": ["zero gradients: the input gradient is exactly 0 for 3/32 examples"]}
    row = metrics_table({"sst2-erm": ev}).splitlines()[2]
    assert row.startswith("| sst2-erm ⚠ |") and "pgd(steps=10) [L2 0.05 x unit norm]: 80.0" in row
    (line,) = cautions({"sst2-erm": ev})
    assert "1 gradient-masking warning(s)" in line and "3/32" in line
    write_report(tmp_path, "r", {"eval": {**ev, "seconds": 1.0, "per_class": {}}})
    assert "token embeddings for text" in (tmp_path / "report.md").read_text()


def test_word_attack_table_says_how_many_examples_were_errors():
    from unirobust.report import word_attack_table

    row = {"n": 10, "n_error": 2, "clean_accuracy": 0.5, "accuracy_under_attack": 0.25, "attack_success_rate": 0.5,
           "mean_perturbed_fraction": 0.1, "mean_queries": 12.0, "seconds_per_example": 0.1}
    assert "| pwws | 10 (2 not attacked: errors) | 50.0 | 25.0 |" in word_attack_table({"pwws": row})
    assert "| pwws | 10 | 50.0 |" in word_attack_table({"pwws": {**row, "n_error": 0}})
