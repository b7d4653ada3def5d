"""The front end: one client session and everything it does for its client.

session.ClientConnection (fields, the hot path, the completion interface backends call),
reader.PacketReader (the client's byte stream: packets, size limit, LOCAL INFILE), login
(handshake and authentication, also COM_CHANGE_USER), tls (TLS over a memory BIO), prepared
(binary-protocol statements), commands (the rarer commands), kill (KILL with rwproxy's session
ids across workers), sharing (queueing on shared connections), slowpath (connect, replay, hold,
wait for a GTID).
"""
