"""The Sendmail milter protocol (version 6) as Postfix speaks it, for spamgate's milter front end.

Layers, lowest first; only `server` does I/O:

* `protocol` -- the wire constants: command and response codes, SMFIF_* action and
  SMFIP_* protocol flags, macro stages.
* `codec` -- bytes to typed events (incremental framing with a maximum packet size;
  bad input becomes a `ProtocolViolation` value, never an exception) and typed
  responses to bytes.
* `negotiate` -- what spamgate asks of the MTA in the option negotiation: the events
  it needs, the replies it may skip, the actions it may take, the macros it wants.
* `macros` -- the macros spamgate reads at each stage, and the `milter_*_macros`
  lines that give them to it on an MTA that does not honour the negotiated lists.
* `connection` -- one MTA connection as a state machine: events in, handler calls and
  reply bytes out, responses checked against the event and the negotiation.
* `handler` -- the interface a milter application implements (one method per event,
  each returning a decision).
* `server` -- the asyncio loop: reads packets with deadlines, calls the handler,
  writes the replies.

References: the milter protocol as implemented by Sendmail's libmilter (mfdef.h,
engine.c) and by Postfix's MTA side (src/milter/milter8.c), and Postfix's
MILTER_README (macros, timeouts, `milter_default_action`).
"""
