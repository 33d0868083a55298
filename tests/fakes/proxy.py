"""What stands in front of a real service and lies: fronts on 127.0.0.1 for hostile-network tests.

- ``Front(reply)``: answers every request with a fixed reply. With a 3xx and a
  ``Location`` it is a redirecting front (an nginx/Caddy sending http to
  https); with an HTML page it is a login wall, a default site or a proxy's
  error page (nginx's ``400 Request Header Or Cookie Too Large``, ``413
  Request Entity Too Large``, a ``404 Not Found``). ``echo=True`` puts the
  request (its line, headers and body) in the body, as some proxies' error
  pages do.
- ``Trickle(interval)``: accepts the connection, reads the request, then sends
  a valid response one byte every ``interval`` seconds (a slow-loris peer).

Every request is recorded (``requests``: method, path, headers, body), so a
test can prove what never reached a host. Replies are complete HTTP/1.1
responses with a Content-Length; ``Trickle`` waits on the server's
``stopping`` event, never on a bare sleep.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

from ._http import FakeServer, QuietHandler, RecordLog

NGINX_400 = (b"<html>\r\n<head><title>400 Request Header Or Cookie Too Large</title></head>\r\n<body>\r\n"
             b"<center><h1>400 Bad Request</h1></center>\r\n<center>Request Header Or Cookie Too Large</center>\r\n"
             b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
NGINX_413 = (b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
             b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
             b"</body>\r\n</html>\r\n")
NGINX_404 = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
             b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form method=post action=/login>"
              b"<input name=user><input name=password type=password></form></body></html>")


class Reply(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "text/html"
    headers: Mapping[str, str] = {}


class Seen(NamedTuple):
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


class _FrontHandler(QuietHandler):
    owner: "Front"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.owner.requests.append(Seen(self.command, self.path, dict(self.headers), body))
        reply = self.owner.reply
        content = reply.body
        if self.owner.echo:
            content += (f"\n{self.command} {self.path}\n".encode()
                        + "".join(f"{k}: {v}\n" for k, v in self.headers.items()).encode() + body)
        self.send_bytes(reply.status, content, reply.content_type, reply.headers)

    do_GET = do_POST = do_PUT = do_HEAD = _any


class Front(FakeServer):
    """Answers every request with `reply`, recording each one."""

    handler_class = _FrontHandler

    def __init__(self, reply: Reply, *, echo: bool = False, port: int = 0):
        super().__init__(port)
        self.reply = reply
        self.echo = echo
        self.requests: RecordLog[Seen] = RecordLog()


class _TrickleHandler(QuietHandler):
    owner: "Trickle"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.owner.requests.append(Seen(self.command, self.path, dict(self.headers), body))
        answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"Ok"}'
        for i in range(len(answer)):
            if not self.write_quietly(answer[i : i + 1]):
                return
            self.wfile.flush()
            if self.owner.stopping.wait(self.owner.interval):
                return
        self.close_connection = True

    do_GET = do_POST = _any


class Trickle(FakeServer):
    """A peer that answers correctly, one byte every `interval` seconds."""

    handler_class = _TrickleHandler

    def __init__(self, interval: float = 0.5, *, port: int = 0):
        super().__init__(port)
        self.interval = interval
        self.requests: RecordLog[Seen] = RecordLog()
