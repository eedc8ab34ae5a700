"""Live status and logs over WebSockets.

Delivery is exactly-once per socket by sequence number: every socket remembers the last seq
it sent for each deployment; a frame that repeats lines is trimmed, a frame that skips lines
is preceded by the missing ones read from the deployment's stream. The same rule covers a
late join, a Redis restart (messages published while we were disconnected) and a socket too
slow to keep up (it catches up from the shared recent frames, then from the stream).

  frames    a batch encoded once as JSON and as a WebSocket frame, shared by every socket
  recent    the newest frames of a deployment, the catch-up source for a lagging socket
  watcher   one socket: its queue, its seqs, the direct write path
  hub       the project -> sockets map, the Redis subscriber, a writer task per busy socket
  protocol  the WebSocket handler and the client messages it accepts
"""
