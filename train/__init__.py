"""LCM-Lookahead encoder training (installed as ``lcmla_sdk.train``; not implemented yet). Depends on the core only."""
