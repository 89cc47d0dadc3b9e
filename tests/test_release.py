"""Keys, the release refusal rules, bundle verification, and the hash-chained audit log (through the CLI)."""

import base64
import json
import os
import shutil
import stat
import time

import pandas as pd
import pytest

from dpsynth.cli import main
from dpsynth.release import load_private_key, new_keys
from dpsynth.errors import DpsynthError
from dpsynth.models.flow import FlowConfig
from dpsynth.train import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_dir, small_df, schema):
    """A small DP model, an independent 'synthetic' table (half the holdout) audited against train + other half."""
    d = tmp_path_factory.mktemp("rel")
    model = d / "model"
    train(small_df, schema, out=model, epsilon=2.0, delta=1e-5,
          config=TrainConfig(epochs=1, batch_size=256, checkpoints=1, flow=FlowConfig(epochs=2)), progress=False)
    ho = pd.read_csv(demo_dir / "holdout.csv")
    half = len(ho) // 2
    ho.iloc[:half].to_csv(d / "holdout_audit.csv", index=False)
    syn = ho.iloc[half:].assign(id=[f"SYN-{i:08d}" for i in range(len(ho) - half)])
    syn.to_csv(d / "synthetic.csv", index=False)
    assert main(["keys", "new", "--out", str(d / "keys")]) == 0
    policy = d / "policy.toml"
    policy.write_text("version = 1\n[audit]\nmax_victims = 800\n")
    rc = main(["audit", "--real", str(demo_dir / "train.csv"), "--holdout", str(d / "holdout_audit.csv"),
               "--synthetic", str(d / "synthetic.csv"), "--schema", str(demo_dir / "schema.json"),
               "--model", str(model), "--policy", str(policy), "--out", str(d / "audit")])
    assert rc == 0
    return d, model, policy


def release(d, model, out, synthetic=None, audit=None):
    return main(["release", "--synthetic", str(synthetic or d / "synthetic.csv"), "--audit", str(audit or d / "audit"),
                 "--model", str(model), "--key", str(d / "keys" / "release.key"), "--out", str(out)])


def verify(d, bundle, pub=None):
    return main(["verify", str(bundle), "--public-key", str(pub or d / "keys" / "release.pub")])


def test_keys_are_private_and_never_overwritten(tmp_path):
    priv, pub = new_keys(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    before = priv.read_bytes()
    with pytest.raises(DpsynthError, match="refusing to overwrite"):
        new_keys(tmp_path)
    assert priv.read_bytes() == before
    os.chmod(priv, 0o644)
    with pytest.warns(UserWarning, match="permissions"):
        load_private_key(priv)
    with pytest.raises(DpsynthError, match="wrong key type|not a readable"):
        load_private_key(pub)  # a public key where a private key belongs


def test_wrong_private_key_type(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    p = tmp_path / "ec.key"
    p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(p, 0o600)
    with pytest.raises(DpsynthError, match="wrong key type"):
        load_private_key(p)


def test_audited_release_is_signed_and_verifies(setup, capsys):
    d, model, _ = setup
    out = d / "release_ok"
    assert release(d, model, out) == 0
    names = {p.name for p in out.iterdir()}
    assert {"synthetic.csv", "report.html", "audit.json", "manifest.json", "manifest.sig"} == names
    man = json.loads((out / "manifest.json").read_text())
    assert man["budget_ledger_head"] and man["model"]["manifest_sha256"] and man["policy_sha256"]
    assert man["privacy"]["differentially_private"] is True
    assert verify(d, out) == 0
    # no per-record distance anywhere in the bundle: the audit's arrays are all short aggregates
    assert "distances" not in (out / "audit.json").read_text()


def test_verify_detects_tampering(setup, tmp_path, capsys):
    d, model, _ = setup
    good = d / "release_t"
    assert release(d, model, good) == 0

    def fresh():
        c = tmp_path / f"c{time.monotonic_ns()}"
        shutil.copytree(good, c)
        return c

    c = fresh()  # one changed byte in the data
    b = bytearray((c / "synthetic.csv").read_bytes())
    b[100] ^= 1
    (c / "synthetic.csv").write_bytes(bytes(b))
    assert verify(d, c) != 0 and "modified" in capsys.readouterr().err
    c = fresh()  # added file
    (c / "extra.txt").write_text("x")
    assert verify(d, c) != 0 and "added" in capsys.readouterr().err
    c = fresh()  # removed file
    (c / "report.html").unlink()
    assert verify(d, c) != 0 and "missing" in capsys.readouterr().err
    c = fresh()  # edited manifest
    (c / "manifest.json").write_text((c / "manifest.json").read_text().replace('"PASS"', '"PASS "'))
    assert verify(d, c) != 0 and "signature does not match" in capsys.readouterr().err
    c = fresh()  # truncated signature
    sig = base64.b64decode((c / "manifest.sig").read_text())
    (c / "manifest.sig").write_text(base64.b64encode(sig[:40]).decode())
    assert verify(d, c) != 0 and "truncated" in capsys.readouterr().err
    other_priv, other_pub = new_keys(tmp_path / "other")  # wrong key
    assert verify(d, good, other_pub) != 0 and "wrong public key" in capsys.readouterr().err


def test_manifest_pointing_outside_the_bundle_is_rejected(setup, tmp_path, capsys):
    """Even a correctly signed manifest may not name ../ paths."""
    from dpsynth.release import load_private_key

    d, model, _ = setup
    b = tmp_path / "evil"
    b.mkdir()
    (tmp_path / "secret.txt").write_text("s")
    man = {"format": "dpsynth-release/1", "files": {"../secret.txt": "0" * 64}, "audit": {"verdict": "PASS"}}
    body = (json.dumps(man) + "\n").encode()
    (b / "manifest.json").write_bytes(body)
    key = load_private_key(d / "keys" / "release.key")
    (b / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode())
    assert verify(d, b) != 0 and "outside the bundle" in capsys.readouterr().err


def test_release_refuses_missing_failed_mismatched_and_stale_audits(setup, tmp_path, demo_dir, small_df, schema, capsys):
    d, model, policy = setup
    # missing audit
    assert release(d, model, tmp_path / "r1", audit=tmp_path / "nope") != 0
    assert "no audit" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    # audit of a different synthetic file
    other = tmp_path / "other.csv"
    pd.read_csv(d / "synthetic.csv").iloc[:-1].to_csv(other, index=False)
    assert release(d, model, tmp_path / "r2", synthetic=other) != 0
    assert "different synthetic file" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    # failed audit: the training rows themselves
    assert main(["audit", "--real", str(demo_dir / "train.csv"), "--holdout", str(d / "holdout_audit.csv"),
                 "--synthetic", str(demo_dir / "train.csv"), "--schema", str(demo_dir / "schema.json"),
                 "--model", str(model), "--policy", str(policy), "--out", str(tmp_path / "bad_audit")]) != 0
    capsys.readouterr()
    assert release(d, model, tmp_path / "r3", synthetic=demo_dir / "train.csv", audit=tmp_path / "bad_audit") != 0
    assert "FAILED" in capsys.readouterr().err and not (tmp_path / "r3").exists()
    # model retrained after the audit
    newer = tmp_path / "model2"
    train(small_df, schema, out=newer, epsilon=2.0, delta=1e-5,
          config=TrainConfig(epochs=1, batch_size=256, checkpoints=1, flow=FlowConfig(epochs=2)), progress=False)
    m = json.loads((newer / "manifest.json").read_text())
    m["created_utc"] = "2999-01-01T00:00:00+00:00"
    (newer / "manifest.json").write_text(json.dumps(m))
    assert release(d, newer, tmp_path / "r4") != 0
    assert "older than the model" in capsys.readouterr().err and not (tmp_path / "r4").exists()
    # every decision is in the hash-chained log, which verifies
    log = tmp_path / "dpsynth-audit-log.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in entries].count("release-refused") == 4
    assert main(["verify", "--log", str(log)]) == 0
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert main(["verify", "--log", str(log)]) != 0
