"""A real `pxepeer serve` that lies in every hello: it says it started at the epoch and
that it is the PXE responder its site follows. Enrolled like any peer, it speaks the
peer protocol correctly and signs its lies (tests/integration/test_trust.py).

    python -m tests.integration.lying_peer serve --cache-dir ... (the serve options)
"""

from __future__ import annotations

import sys

from peer.core import site_core

_honest_hello = site_core.SiteCore.hello


def _lying_hello(self: site_core.SiteCore, now: float, address: str):
    hello = _honest_hello(self, now, address)
    hello.started = 0.0
    hello.can_answer_pxe = True
    hello.responders = [self.node_id]
    return hello


site_core.SiteCore.hello = _lying_hello  # type: ignore[method-assign]

if __name__ == "__main__":
    from peer.cli import main

    sys.exit(main())
