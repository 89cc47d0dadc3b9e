"""`python -m deploy COMMAND` — see deploy/README.md.

  demo      the one-command federated demo on 127.0.0.1 (TLS + node auth)
  pki       consortium CA + SuperLink certificate           (coordinator)
  node-key  a site's SuperNode authentication key pair       (each hospital, on its own machine)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "pki":
        from .certs import make_ca, make_server_cert

        p = argparse.ArgumentParser(prog="python -m deploy pki")
        p.add_argument("--out", required=True)
        p.add_argument("--host", action="append", default=None,
                       help="SuperLink host name or IP for the certificate (repeatable); default 127.0.0.1, localhost")
        a = p.parse_args(rest)
        ca, ca_key = make_ca(a.out)
        cert, key = make_server_cert(a.out, ca_cert=ca, ca_key=ca_key, hosts=tuple(a.host or ("127.0.0.1", "localhost")),
                                     name="superlink")
        print(f"wrote {ca} (give to every site), {cert} and {key} (SuperLink only); keep {ca_key} offline")
        return 0
    if cmd == "node-key":
        from .certs import make_node_key

        p = argparse.ArgumentParser(prog="python -m deploy node-key")
        p.add_argument("--out", required=True)
        p.add_argument("--name", required=True)
        a = p.parse_args(rest)
        priv, pub = make_node_key(a.out, a.name)
        print(f"wrote {priv} (private, 0600: stays at the site) and {pub} (send to the coordinator to register)")
        return 0
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
