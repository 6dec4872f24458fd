"""The Handle binary protocol (RFC 3652, HANDLE.NET 9's protocol 2.11) over UDP and TCP: the
node's answers (``answers``) and its listeners (``server``)."""
