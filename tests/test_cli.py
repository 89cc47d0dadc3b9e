"""The CLI contract end to end on a small slice of the demo cohort (real Opacus, few epochs)."""

import json

import pandas as pd

from dpsynth.cli import main


def test_cli_single_site_flow(tmp_path, capsys):
    data = tmp_path / "data"
    # the structured record only: the note model (the default when the schema has a note column) is tested with
    # tiny configurations in test_text_pipeline.py
    assert main(["demo-data", "--out", str(data), "--no-notes"]) == 0
    assert {p.name for p in data.iterdir()} >= {"train.csv", "holdout.csv", "site_a.csv", "site_b.csv", "site_c.csv", "schema.json"}
    small = tmp_path / "small.csv"
    pd.read_csv(data / "train.csv").iloc[:3000].to_csv(small, index=False)

    # a draft schema is written for review, and training refuses it
    assert main(["schema", "infer", "--data", str(small), "--out", str(tmp_path / "draft.json")]) == 0
    assert json.loads((tmp_path / "draft.json").read_text())["status"] == "draft"
    rc = main(["train", "--data", str(small), "--schema", str(tmp_path / "draft.json"), "--epsilon", "1",
               "--out", str(tmp_path / "m0"), "--quiet"])
    assert rc != 0 and "DRAFT" in capsys.readouterr().err

    # a DP schema: its spend is recorded; a column with too few values for DP bounds (sbp here: 89 % missing)
    # is left for a person to set, as a reviewer would, and then training counts the spend in the budget
    assert main(["schema", "infer", "--data", str(small), "--epsilon", "0.5", "--out", str(tmp_path / "dp.json")]) == 0
    d = json.loads((tmp_path / "dp.json").read_text())
    assert d["dp_spend"]["epsilon"] == 0.5
    for col in d["columns"]:
        if col.pop("review", None):
            col["lower"], col["upper"] = 0, 1000  # public limits chosen by the reviewer
    d["status"] = "reviewed"
    (tmp_path / "dp.json").write_text(json.dumps(d))
    rc = main(["train", "--data", str(small), "--schema", str(tmp_path / "dp.json"), "--epsilon", "2",
               "--out", str(tmp_path / "m1"), "--epochs", "2", "--flow-epochs", "2", "--batch-size", "256", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["budget", str(tmp_path / "m1"), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    mechs = {m["mechanism"] for m in b["mechanisms"]}
    assert {"gaussian-histogram:schema-inference", "dp-sgd:wgan-critic", "dp-sgd:flow"} <= mechs
    assert b["epsilon"] <= 2.0 and b["unit"] == "patient"
    assert set(b["models"]) == {"wgan", "flow"} and "PRV" in b["budget_split"]["rule"]

    # a record-only model, and a malformed budget split named in the error
    rc = main(["train", "--data", str(small), "--schema", str(data / "schema.json"), "--epsilon", "2", "--models", "wgan",
               "--out", str(tmp_path / "w"), "--epochs", "2", "--batch-size", "256", "--quiet"])
    assert rc == 0
    capsys.readouterr()
    assert main(["budget", str(tmp_path / "w"), "--json"]) == 0
    assert "dp-sgd:flow" not in {m["mechanism"] for m in json.loads(capsys.readouterr().out)["mechanisms"]}
    rc = main(["train", "--data", str(small), "--schema", str(data / "schema.json"), "--epsilon", "2",
               "--budget-shares", "wgan", "--out", str(tmp_path / "bad"), "--quiet"])
    assert rc != 0 and "--budget-shares" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    # with the shipped schema: train, generate, evaluate
    rc = main(["train", "--data", str(small), "--schema", str(data / "schema.json"), "--epsilon", "2",
               "--out", str(tmp_path / "m2"), "--epochs", "2", "--flow-epochs", "3", "--batch-size", "256", "--quiet"])
    assert rc == 0
    syn = tmp_path / "syn.csv"
    assert main(["generate", "--model", str(tmp_path / "m2"), "--n", "500", "--out", str(syn)]) == 0
    assert len(pd.read_csv(syn)) == 500
    prov = json.loads((tmp_path / "syn.csv.provenance.json").read_text())
    assert prov["differentially_private"] is True and prov["epsilon"] <= 2.0
    assert main(["generate", "--model", str(tmp_path / "m2"), "--n", "5", "--out", str(syn)]) != 0  # no silent overwrite
    assert len(pd.read_csv(syn)) == 500
    assert main(["evaluate", "--real", str(small), "--holdout", str(data / "holdout.csv"), "--synthetic", str(syn),
                 "--schema", str(data / "schema.json"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").exists()


def test_non_private_outputs_are_marked(tmp_path, demo_dir, capsys):
    small = tmp_path / "small.csv"
    pd.read_csv(demo_dir / "train.csv").iloc[:2000].to_csv(small, index=False)
    rc = main(["train", "--data", str(small), "--schema", str(demo_dir / "schema.json"), "--non-private", "--seed", "1",
               "--out", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "256", "--quiet"])
    assert rc == 0
    assert "NOT differentially private" in capsys.readouterr().err
    syn = tmp_path / "s.csv"
    assert main(["generate", "--model", str(tmp_path / "m"), "--n", "100", "--out", str(syn)]) == 0
    assert "NOT DIFFERENTIALLY PRIVATE" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.csv.provenance.json").read_text())["differentially_private"] is False
    capsys.readouterr()
    assert main(["budget", str(tmp_path / "m")]) == 0
    assert "NOT DIFFERENTIALLY PRIVATE" in capsys.readouterr().out
