"""The test kit: real servers and clients the tests and the benchmarks start
privately on loopback (a DNS server, an SMTP sink, a private Postfix, Redis,
clamd/spamd/rspamd, a milter peer, DKIM keys, a raw SMTP client, MIME makers).

`bench/` imports it as the tests do; nothing here is a test.
"""
