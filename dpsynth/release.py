"""Signed release bundles: keys, manifest, Ed25519 signature, verification, and the gate's audit log.

A bundle directory holds the synthetic data, report.html, audit.json, manifest.json (SHA-256 of every file,
model and schema hashes, policy, budget ledger head, tool versions, UTC time) and manifest.sig (Ed25519 over
the exact bytes of manifest.json, base64). ``verify`` fails on any changed, added or removed byte, a wrong
key, a truncated signature or a manifest entry pointing outside the bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import shutil
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import AuditFailedError, DpsynthError
from .io_utils import atomic_write_bytes, atomic_write_json, read_json, sha256_file

RELEASE_FORMAT = "dpsynth-release/1"
CONTROL_FILES = ("manifest.json", "manifest.sig")


class VerificationError(DpsynthError):
    exit_code = 5


# ---- keys -----------------------------------------------------------------------------------------

def new_keys(out: str | os.PathLike, name: str = "release") -> tuple[Path, Path]:
    """Ed25519 key pair. The private key is created 0600 with O_EXCL: an existing key is never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise DpsynthError(f"{p} already exists: refusing to overwrite a key (move it away first)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(pub_path, pub, mode=0o644)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.exists():
        raise DpsynthError(f"private key {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        warnings.warn(f"private key {path} has permissions {oct(mode)}: others can read it; run chmod 600 {path}",
                      stacklevel=2)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise DpsynthError(f"{path}: not a readable PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DpsynthError(f"{path}: wrong key type {type(key).__name__}; dpsynth signs with Ed25519 only")
    return key


def load_public_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    if not path.exists():
        raise DpsynthError(f"public key {path} does not exist")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise VerificationError(f"{path}: not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"{path}: wrong key type {type(key).__name__}; expected Ed25519")
    return key


def key_fingerprint(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---- versions ---------------------------------------------------------------------------------------

def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"dpsynth": __version__, "python": platform.python_version()}
    for pkg in ("torch", "opacus", "numpy", "pandas", "scikit-learn", "cryptography", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ---- bundle -----------------------------------------------------------------------------------------

def _safe_member(bundle: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel in CONTROL_FILES or not rel:
        raise VerificationError(f"manifest entry {rel!r} points outside the bundle or at a control file")
    full = (bundle / p).resolve()
    if not str(full).startswith(str(bundle.resolve()) + os.sep):
        raise VerificationError(f"manifest entry {rel!r} resolves outside the bundle")
    return full


def check_release_allowed(*, audit_dir: Path, synthetic: Path, model_manifest: dict | None, model_manifest_sha: str | None) -> dict:
    """Everything that must hold before a release is signed; raises AuditFailedError with the reason."""
    apath = audit_dir / "audit.json"
    if not apath.exists():
        raise AuditFailedError(f"no audit found in {audit_dir} (run `dpsynth audit` first): nothing is released unaudited")
    audit = read_json(apath, "audit")
    if audit.get("format") != "dpsynth-audit/1":
        raise AuditFailedError(f"{apath}: not a dpsynth audit")
    syn_sha = sha256_file(synthetic)
    if audit.get("synthetic_sha256") != syn_sha:
        raise AuditFailedError(
            f"the audit in {audit_dir} was run on a different synthetic file (audit {str(audit.get('synthetic_sha256'))[:12]}…, "
            f"{synthetic} {syn_sha[:12]}…): audit this file"
        )
    if not audit["gate"]["passed"]:
        raise AuditFailedError(f"the audit FAILED the release gate: {', '.join(audit['gate']['failed'])}")
    if model_manifest is not None:
        if audit.get("created_utc", "") < model_manifest.get("created_utc", ""):
            raise AuditFailedError(f"the audit ({audit.get('created_utc')}) is older than the model "
                                   f"({model_manifest.get('created_utc')}): audit again")
        audited_model = (audit.get("provenance") or {}).get("model_manifest_sha256")
        if audited_model and model_manifest_sha and audited_model != model_manifest_sha:
            raise AuditFailedError("the audit was run for a different model (model manifest hash differs)")
    return audit


def build_release(*, synthetic: str | os.PathLike, audit_dir: str | os.PathLike, model_dir: str | os.PathLike | None,
                  key_path: str | os.PathLike, out: str | os.PathLike, log_path: str | os.PathLike | None = None,
                  overwrite: bool = False) -> dict:
    from .io_utils import output_dir
    from .privacy.ledger import Ledger

    synthetic, audit_dir, out = Path(synthetic), Path(audit_dir), Path(out)
    log = Ledger(log_path or (out.parent / "dpsynth-audit-log.jsonl"))
    if not synthetic.exists():
        raise DpsynthError(f"synthetic file {synthetic} does not exist")
    key = load_private_key(key_path)
    model_manifest = model_sha = None
    if model_dir is not None:
        mpath = Path(model_dir) / "manifest.json"
        if not mpath.exists():
            raise DpsynthError(f"{model_dir} is not a complete dpsynth model (no manifest.json)")
        model_manifest, model_sha = read_json(mpath, "model manifest"), sha256_file(mpath)
    try:
        audit = check_release_allowed(audit_dir=audit_dir, synthetic=synthetic, model_manifest=model_manifest,
                                      model_manifest_sha=model_sha)
    except AuditFailedError as e:
        log.append("release-refused", {"synthetic_sha256": sha256_file(synthetic), "reason": str(e), "out": str(out)})
        raise
    with output_dir(out, overwrite=overwrite) as tmp:
        shutil.copyfile(synthetic, tmp / synthetic.name)
        shutil.copyfile(audit_dir / "audit.json", tmp / "audit.json")
        shutil.copyfile(audit_dir / "report.html", tmp / "report.html")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        ledger_head = None
        if model_dir is not None and (Path(model_dir) / "ledger.jsonl").exists():
            ledger_head = Ledger(Path(model_dir) / "ledger.jsonl").verify()
        manifest = {
            "format": RELEASE_FORMAT,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "synthetic_file": synthetic.name,
            "model": None if model_manifest is None else {
                "manifest_sha256": model_sha,
                "files": model_manifest.get("files"),
                "created_utc": model_manifest.get("created_utc"),
            },
            "schema_sha256": audit.get("schema_sha256"),
            "privacy": audit.get("dp"),
            "audit": {"verdict": audit["gate"]["verdict"], "created_utc": audit.get("created_utc"),
                      "sha256": files["audit.json"]},
            "policy": audit.get("policy"),
            "policy_sha256": audit["gate"]["policy_sha256"],
            "budget_ledger_head": ledger_head,
            "tool_versions": tool_versions(),
            "signing_key_sha256": key_fingerprint(key.public_key()),
        }
        body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        (tmp / "manifest.json").write_bytes(body)
        (tmp / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode() + "\n")
    log.append("release-signed", {"synthetic_sha256": files[synthetic.name], "out": str(out),
                                  "manifest_sha256": hashlib.sha256(body).hexdigest(), "verdict": "PASS"})
    return manifest


def verify_release(bundle: str | os.PathLike, public_key_path: str | os.PathLike) -> dict:
    """Raise VerificationError unless the signature and every file hash hold and nothing was added/removed."""
    from cryptography.exceptions import InvalidSignature

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise VerificationError(f"{bundle} is not a release directory")
    mpath, spath = bundle / "manifest.json", bundle / "manifest.sig"
    for p in (mpath, spath):
        if not p.exists():
            raise VerificationError(f"{p} is missing")
    key = load_public_key(public_key_path)
    body = mpath.read_bytes()
    try:
        sig = base64.b64decode(spath.read_text().strip(), validate=True)
    except (ValueError, UnicodeDecodeError):
        raise VerificationError(f"{spath}: not a base64 signature") from None
    if len(sig) != 64:
        raise VerificationError(f"{spath}: signature is {len(sig)} bytes, an Ed25519 signature has 64 (truncated?)")
    try:
        key.verify(sig, body)
    except InvalidSignature:
        raise VerificationError("signature does not match the manifest (modified manifest or wrong public key)") from None
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError:
        raise VerificationError(f"{mpath}: not valid JSON") from None
    if manifest.get("format") != RELEASE_FORMAT:
        raise VerificationError(f"{mpath}: unknown release format {manifest.get('format')!r}")
    listed = manifest.get("files") or {}
    for rel, digest in listed.items():
        p = _safe_member(bundle, rel)
        if not p.exists():
            raise VerificationError(f"{rel} is listed in the manifest but missing from the bundle")
        if sha256_file(p) != digest:
            raise VerificationError(f"{rel} was modified (SHA-256 differs from the manifest)")
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(listed) - set(CONTROL_FILES))
    if extra:
        raise VerificationError(f"files not in the manifest were added to the bundle: {extra}")
    return manifest


def verify_log(path: str | os.PathLike) -> int:
    from .privacy.ledger import Ledger, LedgerError

    p = Path(path)
    if not p.exists():
        raise VerificationError(f"audit log {p} does not exist")
    try:
        Ledger(p).verify()
    except LedgerError as e:
        raise VerificationError(str(e)) from None
    return len(Ledger(p).entries())


def write_audit(out: str | os.PathLike, audit: dict, html_text: str, *, overwrite: bool = False) -> None:
    from .io_utils import atomic_write_text, output_dir

    with output_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "audit.json", audit)
        atomic_write_text(tmp / "report.html", html_text)
