"""The checks: one per module, registered in `registry.py`; `engines/` holds what
they are built on (DNS lists, SPF and DKIM evaluation, the content view, links,
the MIME walk, archives, and the clients of clamd, spamd and rspamd)."""
